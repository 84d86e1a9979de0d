"""Background runs over real HTTP, once per store backend: start, watch, resume, fan-out, cancel, delete, priority."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Fault, Reply
from tests.support.runs import TERMINAL, USER, start, wait_status, watch, watch_first
from tests.support.server import ServerProcess
from tests.support.sse import parse_sse


def test_lifecycle_start_watch_complete(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["a", "b", "c"], usage=(7, 3))])
    mid = start(bg, correlation_id="corr-9", metadata={"user_id": "u1"}, priority=2)
    assert mid.startswith("msg_")
    frames = watch(bg, mid)
    assert [f["event"] for f in frames] == [
        "stream_start",
        "step_start",
        "text_start",
        "text_delta",
        "text_delta",
        "text_delta",
        "text_complete",
        "step_finish",
        "stream_end",
    ]
    assert [f["id"] for f in frames] == list(range(1, 10))
    assert all(f["data"]["message_id"] == mid for f in frames)
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    status = wait_status(bg, mid, {"completed"})
    assert status["message_id"] == mid and status["stream_type"] == "chat_completion"
    assert status["error_message"] is None
    for key in ("created_at", "updated_at", "completed_at"):
        assert status[key].endswith("Z") and "T" in status[key]
    meta = status["metadata"]
    assert meta["model"] == "gpt" and meta["provider"] == "openai" and meta["priority"] == 2
    assert meta["correlation_id"] == "corr-9" and meta["event_count"] == 9
    assert meta["usage"]["prompt_tokens"] == 7 and meta["usage"]["completion_tokens"] == 3


def test_custom_id_duplicate_and_bad_ids(bg: httpx.Client, fake: FakeUpstream, bg_server: ServerProcess) -> None:
    mid = f"custom-{bg_server.name}-{time.monotonic_ns()}"
    assert start(bg, mid) == mid
    resp = bg.post("/v1/messages/async", params={"message_id": mid}, json={"model": "gpt", "messages": USER})
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict_error"
    for bad in ("has space", "x" * 129, "sl/ash", "dots.not.allowed", "\u00fcml"):
        resp = bg.post("/v1/messages/async", params={"message_id": bad}, json={"model": "gpt", "messages": USER})
        assert resp.status_code == 422, bad
        assert resp.json()["error"]["details"][0]["field"] == "message_id"
    resp = bg.post("/v1/messages/async", json={"model": "gpt", "messages": []})
    assert resp.status_code == 422
    wait_status(bg, mid, TERMINAL)


def test_unknown_id_is_404_everywhere(bg: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/messages/async/nope/stream"),
        ("GET", "/v1/messages/async/nope/status"),
        ("POST", "/v1/messages/async/nope/cancel"),
        ("DELETE", "/v1/messages/async/nope"),
        ("DELETE", "/v1/messages/async/nope/delete"),
        ("GET", "/v1/messages/async/bad%20id/status"),
    ]:
        resp = bg.request(method, path)
        assert resp.status_code == 404, (method, path)
        assert resp.json()["error"]["type"] == "not_found_error"


def test_resume_with_last_event_id_and_after(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(30)], delay=0.01)])
    mid = start(bg)
    first = watch_first(bg, mid, 10)
    assert [f["id"] for f in first] == list(range(1, 11))
    rest_header = watch(bg, mid, headers={"Last-Event-ID": "10"})
    rest_query = watch(bg, mid, params={"after": 10})
    full = watch(bg, mid)
    assert first + rest_header == full
    assert first + rest_query == full
    assert [f["id"] for f in full] == list(range(1, len(full) + 1)) and full[-1]["event"] == "stream_end"
    # a late watcher of a finished run gets the whole run, and the connection closes
    wait_status(bg, mid, {"completed"})
    assert watch(bg, mid) == full
    assert watch(bg, mid, params={"after": len(full)}) == []
    resp = bg.get(f"/v1/messages/async/{mid}/stream", params={"after": -1})
    assert resp.status_code == 422
    resp = bg.get(f"/v1/messages/async/{mid}/stream", headers={"Last-Event-ID": "ten"})
    assert resp.status_code == 422


def test_disconnecting_watcher_does_not_cancel(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(20)], delay=0.02)])
    mid = start(bg)
    watch_first(bg, mid, 4)
    status = wait_status(bg, mid, TERMINAL)
    assert status["status"] == "completed"
    assert watch(bg, mid)[-1]["data"]["finish_reason"] == "Stop"


def _stalled_watcher(url: str, mid: str) -> socket.socket:
    """A client that asks for the stream and then reads nothing, with a tiny receive buffer."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(f"GET /v1/messages/async/{mid}/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def _drain(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def _dechunk(raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2 :]
    return out


def test_fan_out_with_a_stalled_watcher(bg: httpx.Client, fake: FakeUpstream, bg_server: ServerProcess) -> None:
    tokens = [f"{i:04d}" + "x" * 1500 for i in range(200)]  # ~330 KB of frames: more than a stalled socket buffers
    fake.script("gpt-up", [Reply(tokens=tokens, delay=0.01)])
    mid = start(bg, max_tokens=500)
    stalled = _stalled_watcher(bg_server.url, mid)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: watch(httpx.Client(base_url=bg_server.url, timeout=30), mid), range(20)))
    status = wait_status(bg, mid, {"completed"})
    first, last = results[0][0]["data"], results[0][-1]["data"]
    duration = last["timestamp"] - first["timestamp"]
    assert duration <= 4, f"the run took {duration}s; 200 tokens at 10 ms should take about 2 s"
    assert all(r == results[0] for r in results), "every watcher sees the identical sequence"
    assert len(results[0]) == status["metadata"]["event_count"]
    time.sleep(0)  # the stalled watcher has read nothing so far; now it drains
    late = parse_sse(_dechunk(_drain(stalled)))
    assert late == results[0]


def test_cancel_closes_upstream_and_ends_stream(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(200)], delay=0.05)])
    mid = start(bg)
    watch_first(bg, mid, 5)
    rec = fake.requests[-1]
    resp = bg.post(f"/v1/messages/async/{mid}/cancel")
    cancelled_at = time.monotonic()
    assert resp.status_code == 200
    assert resp.json() == {"message": "Stream cancelled successfully", "message_id": mid}
    assert fake.wait_for_client_close(rec, timeout=3) - cancelled_at < 1.0
    frames = watch(bg, mid)
    assert frames[-1]["event"] == "stream_end" and frames[-1]["data"]["finish_reason"] == "Cancelled"
    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
    status = bg.get(f"/v1/messages/async/{mid}/status").json()
    assert status["status"] == "cancelled" and status["completed_at"]
    assert bg.post(f"/v1/messages/async/{mid}/cancel").status_code == 200, "cancelling twice is fine"


def test_cancel_completed_run_is_409(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["done"])])
    mid = start(bg)
    wait_status(bg, mid, {"completed"})
    resp = bg.post(f"/v1/messages/async/{mid}/cancel")
    assert resp.status_code == 409 and resp.json()["error"]["type"] == "conflict_error"


def test_failed_run_status_and_409(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(status=400)])
    mid = start(bg)
    status = wait_status(bg, mid, TERMINAL)
    assert status["status"] == "failed" and "400" in status["error_message"]
    frames = watch(bg, mid)
    assert [f["event"] for f in frames] == ["stream_start", "stream_end"]
    assert frames[-1]["data"]["finish_reason"] == "Error"
    assert bg.post(f"/v1/messages/async/{mid}/cancel").status_code == 409


@pytest.mark.parametrize("path", ["", "/delete"])
def test_delete_active_run(bg: httpx.Client, fake: FakeUpstream, path: str) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(200)], delay=0.05)])
    mid = start(bg)
    watch_first(bg, mid, 4)
    rec = fake.requests[-1]
    resp = bg.delete(f"/v1/messages/async/{mid}{path}")
    assert resp.status_code == 204 and resp.content == b""
    fake.wait_for_client_close(rec, timeout=2)
    assert bg.get(f"/v1/messages/async/{mid}/status").status_code == 404
    assert bg.get(f"/v1/messages/async/{mid}/stream").status_code == 404
    assert bg.delete(f"/v1/messages/async/{mid}").status_code == 404


def test_priority_order_under_max_concurrency(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-one-up", [Reply(tokens=["blocker"], ttft=0.8), Reply(tokens=["ok"])])
    blocker = start(bg, model="gpt-one", messages=[{"role": "user", "content": "blocker"}])
    fake.wait_for_requests(1)
    ids = {
        p: start(bg, model="gpt-one", priority=p, messages=[{"role": "user", "content": f"p{p}"}]) for p in (5, 0, 3)
    }
    for p, mid in ids.items():
        assert bg.get(f"/v1/messages/async/{mid}/status").json()["status"] == "pending", p
    for mid in (blocker, *ids.values()):
        assert wait_status(bg, mid, TERMINAL)["status"] == "completed"
    order = [r.body["messages"][-1]["content"] for r in fake.requests]
    assert order == ["blocker", "p0", "p3", "p5"]
    assert fake.peak_open_streams == 1


def test_cancel_pending_run(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-one-up", [Reply(tokens=["slow"], ttft=1.0), Reply(tokens=["never"])])
    blocker = start(bg, model="gpt-one")
    fake.wait_for_requests(1)
    queued = start(bg, model="gpt-one")
    assert bg.post(f"/v1/messages/async/{queued}/cancel").status_code == 200
    frames = watch(bg, queued)
    assert [f["event"] for f in frames] == ["stream_end"] and frames[0]["data"]["finish_reason"] == "Cancelled"
    assert wait_status(bg, blocker, TERMINAL)["status"] == "completed"
    assert len(fake.requests) == 1, "the cancelled run never reached the upstream"


def test_background_run_on_local_model(bg: httpx.Client) -> None:
    mid = start(bg, model="local", max_tokens=12, messages=[{"role": "user", "content": "Say hi."}])
    frames = watch(bg, mid)
    assert frames[0]["data"]["provider"] == "local"
    assert any(f["event"] == "text_delta" for f in frames)
    assert frames[-1]["data"]["finish_reason"] in ("Stop", "Length")
    assert wait_status(bg, mid, TERMINAL)["status"] == "completed"


def test_status_shows_processing_while_running(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(100)], delay=0.05)])
    mid = start(bg)
    watch_first(bg, mid, 3)
    status = bg.get(f"/v1/messages/async/{mid}/status").json()
    assert status["status"] == "processing" and status["completed_at"] is None
    assert status["metadata"]["event_count"] >= 3
    bg.delete(f"/v1/messages/async/{mid}")


def test_hang_then_timeout_fails_run(bg: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-slow-up", [Reply(fault=Fault.HANG)])
    mid = start(bg, model="gpt-slow")
    status = wait_status(bg, mid, TERMINAL)
    assert status["status"] == "failed" and "did not answer" in status["error_message"]
