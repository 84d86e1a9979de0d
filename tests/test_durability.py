"""Crash safety, retention, caps and the queue limit: each against its own server process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Fault, Reply
from tests.support.runs import TERMINAL, USER, start, wait_status, watch, watch_first
from tests.support.server import ServerProcess, fake_models


@pytest.fixture()
def tmp_server(fake: FakeUpstream, tmp_path: Path):
    """Factory for short-lived servers with their own settings."""
    servers: list[ServerProcess] = []

    def make(name: str = "tmp", **config: Any) -> ServerProcess:
        srv = ServerProcess(tmp_path, {"models": fake_models(fake), "keepalive_s": 1, **config}, name=name).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def test_kill_9_mid_stream_then_restart(fake: FakeUpstream, tmp_server: Any) -> None:
    srv = tmp_server("crash", store="sqlite")
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(400)], delay=0.02)])
    fake.script("gpt-one-up", [Reply(fault=Fault.HANG), Reply(tokens=["after", " restart"])])
    with srv.client() as c:
        running = [start(c) for _ in range(3)]
        blocker = start(c, model="gpt-one")  # holds gpt-one's only slot, never produces a token
        fake.wait_for_requests(4)
        queued = start(c, model="gpt-one", messages=[{"role": "user", "content": "queued"}])
        seen = {mid: watch_first(c, mid, 12) for mid in running}
        assert c.get(f"/v1/messages/async/{queued}/status").json()["status"] == "pending"
    srv.kill()
    srv.start()
    with srv.client() as c:
        for mid in running:
            status = c.get(f"/v1/messages/async/{mid}/status").json()
            assert status["status"] == "error" and status["completed_at"]
            assert "stopped" in status["error_message"]
            frames = watch(c, mid)
            assert frames[: len(seen[mid])] == seen[mid], "every event a watcher received is still there"
            assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
            assert frames[-1]["event"] == "stream_end" and frames[-1]["data"]["finish_reason"] == "Error"
            assert status["metadata"]["event_count"] == len(frames)
        # runs that had produced nothing are started again: the blocker (hangs again? no: its next reply) and the queued one
        for mid in (blocker, queued):
            assert wait_status(c, mid, TERMINAL, timeout=15)["status"] == "completed"
        texts = [f["data"]["text"] for f in watch(c, queued) if f["event"] == "text_complete"]
        assert texts == ["after restart"]
        nothing_stuck = [c.get(f"/v1/messages/async/{m}/status").json()["status"] for m in (*running, blocker, queued)]
        assert not {"pending", "processing"} & set(nothing_stuck)


def test_graceful_stop_ends_running_runs_and_keeps_queued_ones(fake: FakeUpstream, tmp_server: Any) -> None:
    srv = tmp_server("graceful", store="sqlite")
    fake.script(
        "gpt-one-up", [Reply(tokens=[f"t{i}" for i in range(400)], delay=0.02), Reply(tokens=["queued", " one"])]
    )
    with srv.client() as c:
        mid = start(c, model="gpt-one")
        watch_first(c, mid, 5)
        queued = start(c, model="gpt-one")  # waits for gpt-one's only slot
        assert c.get(f"/v1/messages/async/{queued}/status").json()["status"] == "pending"
    srv.stop()
    srv.start()
    with srv.client() as c:
        status = c.get(f"/v1/messages/async/{mid}/status").json()
        assert status["status"] == "error" and "shut down" in status["error_message"]
        assert watch(c, mid)[-1]["data"]["finish_reason"] == "Error"
        assert wait_status(c, queued, TERMINAL)["status"] == "completed"
        assert [f["data"]["text"] for f in watch(c, queued) if f["event"] == "text_complete"] == ["queued one"]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_finished_runs_expire(fake: FakeUpstream, tmp_server: Any, store: str) -> None:
    srv = tmp_server(f"retain-{store}", store=store, runs={"retention_s": 1})
    with srv.client() as c:
        mid = start(c)
        wait_status(c, mid, {"completed"})
        deadline = time.monotonic() + 10
        while c.get(f"/v1/messages/async/{mid}/status").status_code == 200:
            assert time.monotonic() < deadline, "run was not removed after its retention"
            time.sleep(0.1)
        assert c.get(f"/v1/messages/async/{mid}/stream").status_code == 404


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_event_and_byte_caps_fail_the_run(fake: FakeUpstream, tmp_server: Any, store: str) -> None:
    srv = tmp_server(f"caps-{store}", store=store, runs={"max_events": 20, "max_bytes": 20000})
    with srv.client() as c:
        fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(50)])])
        mid = start(c)
        status = wait_status(c, mid, TERMINAL)
        assert status["status"] == "failed" and "max_events" in status["error_message"]
        frames = watch(c, mid)
        assert len(frames) == 20 and frames[-1]["data"]["error"]["type"] == "limit_exceeded"
        fake.script("gpt-up", [Reply(tokens=["y" * 3000 for _ in range(10)])])
        mid = start(c)
        status = wait_status(c, mid, TERMINAL)
        assert status["status"] == "failed" and "max_bytes" in status["error_message"]
        assert sum(len(f["data"].get("delta", "")) for f in watch(c, mid)) < 20000


def test_full_queue_answers_429(fake: FakeUpstream, tmp_server: Any) -> None:
    srv = tmp_server("queue", store="memory", runs={"queue_limit": 2})
    # Every run hangs: one that completed before its cancel would rightly answer 409.
    fake.script("gpt-one-up", [Reply(fault=Fault.HANG)] * 4)
    with srv.client() as c:
        a = start(c, model="gpt-one")
        b = start(c, model="gpt-one")
        resp = c.post("/v1/messages/async", json={"model": "gpt-one", "messages": USER})
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert c.post(f"/v1/messages/async/{a}/cancel").status_code == 200
        c2 = start(c, model="gpt-one")  # room again
        for mid in (b, c2):
            assert c.post(f"/v1/messages/async/{mid}/cancel").status_code == 200


def test_default_store_is_sqlite_in_data_dir(fake: FakeUpstream, tmp_server: Any, tmp_path: Path) -> None:
    srv = tmp_server("defaults")
    with srv.client() as c:
        mid = start(c)
        wait_status(c, mid, {"completed"})
    assert (tmp_path / "defaults-data" / "backstream.db").is_file()
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/readyz").json() == {"status": "ready"}
