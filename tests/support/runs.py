"""Background runs over HTTP: start one, watch it, wait for its status, check its log is whole."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from tests.support.fake_upstream import Reply
from tests.support.sse import parse_sse, parse_sse_prefix

USER = [{"role": "user", "content": "hi"}]
TERMINAL = {"completed", "failed", "cancelled", "error"}
# The status a run ends in, by its stream_end finish_reason (Error: "error" or "failed", see check_run).
STATUS_OF = {
    "Stop": "completed",
    "Length": "completed",
    "StopSequence": "completed",
    "ToolUse": "completed",
    "Cancelled": "cancelled",
}


def slow(n: int = 300, delay: float = 0.03, **kw: Any) -> Reply:
    """A reply long enough to still be running when a test interferes with it."""
    return Reply(tokens=[f"t{i} " for i in range(n)], delay=delay, **kw)


def start(c: httpx.Client, message_id: str | None = None, **payload: Any) -> str:
    params = {"message_id": message_id} if message_id else None
    resp = c.post(
        "/v1/messages/async", params=params, json={"model": "gpt", "max_tokens": 64, "messages": USER, **payload}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "pending" and body["message"] == "Request initiated successfully"
    return body["message_id"]


def watch(
    c: httpx.Client, mid: str, headers: dict[str, str] | None = None, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The whole stream, until the server closes it."""
    with c.stream("GET", f"/v1/messages/async/{mid}/stream", headers=headers, params=params) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return parse_sse(resp.read())


def watch_first(c: httpx.Client, mid: str, n: int) -> list[dict[str, Any]]:
    """Read the first n events, then disconnect."""
    buf = b""
    with c.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
        for chunk in resp.iter_raw():
            buf += chunk
            frames = parse_sse_prefix(buf)
            if len(frames) >= n:
                return frames[:n]
    raise AssertionError(f"stream ended before {n} events")


def wait_status(c: httpx.Client, mid: str, statuses: set[str], timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = c.get(f"/v1/messages/async/{mid}/status").json()
        if body.get("status") in statuses or time.monotonic() > deadline:
            assert body.get("status") in statuses, body
            return body
        time.sleep(0.02)


def wait_events(c: httpx.Client, mid: str, n: int, timeout: float = 10) -> None:
    """Until the run has logged at least n events."""
    deadline = time.monotonic() + timeout
    while c.get(f"/v1/messages/async/{mid}/status").json()["metadata"]["event_count"] < n:
        assert time.monotonic() < deadline, f"run {mid} reached {n} events"
        time.sleep(0.02)


def check_run(c: httpx.Client, mid: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The run is terminal, its log is 1..K with one stream_end last, and the status agrees with it."""
    status = wait_status(c, mid, TERMINAL, timeout=timeout)
    frames = watch(c, mid)
    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1)), "no gap, no duplicate"
    ends = [f for f in frames if f["event"] == "stream_end"]
    assert len(ends) == 1 and frames[-1] is ends[0], (
        f"exactly one stream_end, last: {[f['event'] for f in frames][-3:]}"
    )
    end = ends[0]["data"]
    expected = STATUS_OF.get(end["finish_reason"]) or ("error" if end["error"]["type"] == "api_error" else "failed")
    assert status["status"] == expected, (status, end)
    assert status["metadata"]["event_count"] == len(frames)
    return frames


class Watcher:
    """Reads a run's stream in a thread until the server closes it; records how it ended."""

    def __init__(self, url: str, mid: str) -> None:
        self.url, self.mid = url, mid
        self.frames: list[dict[str, Any]] = []
        self.clean = False  # the body ended normally (not cut)
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.first.wait(10), "watcher got its first event"

    def _run(self) -> None:
        buf = b""
        try:
            with (
                httpx.Client(base_url=self.url, timeout=30) as c,
                c.stream("GET", f"/v1/messages/async/{self.mid}/stream") as resp,
            ):
                for chunk in resp.iter_raw():
                    buf += chunk
                    if b"\n\n" in buf:
                        self.frames = parse_sse_prefix(buf)
                        self.first.set()
            self.clean = True
        except httpx.HTTPError:
            pass
        finally:
            self.frames = parse_sse_prefix(buf)
            self.first.set()

    def join(self, timeout: float = 15) -> Watcher:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watch ended"
        return self
