"""Several server processes sharing one Redis: watch, cancel and delete anywhere; takeover; global limits."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.replicas import LEASE_S, replica_config
from tests.support.runs import TERMINAL, USER, start, wait_status, watch, watch_first
from tests.support.server import ServerProcess

# Every test here runs replicas on the suite's Redis database.
pytestmark = pytest.mark.usefixtures("redis_db")


@pytest.fixture()
def replicas(fake: FakeUpstream, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    prefix = f"bsrep-{uuid.uuid4().hex[:8]}"
    a = ServerProcess(tmp_path, replica_config(fake, prefix), name="replica-a").start()
    b = ServerProcess(tmp_path, replica_config(fake, prefix), name="replica-b").start()
    yield a, b
    a.stop()
    b.stop()


def test_watch_cancel_delete_across_replicas(replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream) -> None:
    a, b = replicas
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(40)], delay=0.01)])
    with a.client() as ca, b.client() as cb:
        mid = start(ca)
        with ThreadPoolExecutor(2) as pool:
            on_a = pool.submit(watch, ca, mid)
            on_b = pool.submit(watch, cb, mid)
            frames_a, frames_b = on_a.result(), on_b.result()
        assert frames_a == frames_b and frames_b[-1]["data"]["finish_reason"] == "Stop"
        assert [f["id"] for f in frames_b] == list(range(1, len(frames_b) + 1))
        assert wait_status(cb, mid, {"completed"})["metadata"]["event_count"] == len(frames_b)

        fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(400)], delay=0.05)])
        mid = start(ca)
        watch_first(cb, mid, 5)
        rec = fake.requests[-1]
        resp = cb.post(f"/v1/messages/async/{mid}/cancel")
        cancelled_at = time.monotonic()
        assert resp.status_code == 200
        assert fake.wait_for_client_close(rec, timeout=3) - cancelled_at < 1.0, "the upstream called by A is closed"
        assert ca.get(f"/v1/messages/async/{mid}/status").json()["status"] == "cancelled"
        frames = watch(ca, mid)
        assert frames[-1]["data"]["finish_reason"] == "Cancelled"
        assert watch(cb, mid) == frames

        mid = start(ca)
        watch_first(cb, mid, 3)
        rec = fake.requests[-1]
        assert cb.delete(f"/v1/messages/async/{mid}").status_code == 204
        fake.wait_for_client_close(rec, timeout=3)
        assert ca.get(f"/v1/messages/async/{mid}/status").status_code == 404
        assert ca.get(f"/v1/messages/async/{mid}/stream").status_code == 404


def test_custom_id_is_unique_across_replicas(replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream) -> None:
    a, b = replicas
    with a.client() as ca, b.client() as cb:
        start(ca, "shared-id")
        resp = cb.post(
            "/v1/messages/async", params={"message_id": "shared-id"}, json={"model": "gpt", "messages": USER}
        )
        assert resp.status_code == 409


def test_global_concurrency_and_priority(replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream) -> None:
    a, b = replicas
    fake.script("gpt-two-up", [Reply(tokens=["x"] * 5, delay=0.05)])
    with a.client() as ca, b.client() as cb:
        ids = [start(ca if i % 2 else cb, model="gpt-two") for i in range(10)]
        for mid in ids:
            assert wait_status(ca, mid, TERMINAL, timeout=20)["status"] == "completed"
    assert len(fake.requests) == 10
    assert fake.peak_open_streams == 2, "never more than max_concurrency upstream requests across both replicas"


def test_priority_holds_across_replicas(replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream) -> None:
    a, b = replicas
    fake.script("gpt-one-up", [Reply(tokens=["blocker"], ttft=1.0), Reply(tokens=["ok"])])
    with a.client() as ca, b.client() as cb:
        blocker = start(ca, model="gpt-one", messages=[{"role": "user", "content": "blocker"}])
        fake.wait_for_requests(1)
        ids = [
            start(c, model="gpt-one", priority=p, messages=[{"role": "user", "content": f"p{p}"}])
            for c, p in ((cb, 5), (ca, 0), (cb, 3))
        ]
        for mid in (blocker, *ids):
            assert wait_status(ca, mid, TERMINAL, timeout=20)["status"] == "completed"
    assert [r.body["messages"][-1]["content"] for r in fake.requests] == ["blocker", "p0", "p3", "p5"]


def test_takeover_after_kill_9(fake: FakeUpstream, tmp_path: Path) -> None:
    prefix = f"bsrep-{uuid.uuid4().hex[:8]}"
    a = ServerProcess(tmp_path, replica_config(fake, prefix), name="takeover-a").start()
    slow = Reply(tokens=[f"s{i}" for i in range(1000)], delay=0.02)
    fake.script("gpt-four-up", [slow, slow, slow, slow, Reply(tokens=["quick"])])
    b = None
    try:
        with a.client() as ca:
            ids = [start(ca, model="gpt-four") for _ in range(20)]
            fake.wait_for_requests(4)
            in_flight = [r.body for r in fake.requests]
            assert len(in_flight) == 4
            b = ServerProcess(tmp_path, replica_config(fake, prefix), name="takeover-b").start()
            with b.client() as cb:
                running = [m for m in ids if cb.get(f"/v1/messages/async/{m}/status").json()["status"] == "processing"]
                assert len(running) == 4
                seen = {m: watch_first(cb, m, 8) for m in running}
                a.kill()
                killed_at = time.monotonic()
                for m in running:
                    status = wait_status(cb, m, TERMINAL, timeout=10)
                    assert status["status"] == "error" and "stopped" in status["error_message"]
                    frames = watch(cb, m)
                    assert frames[: len(seen[m])] == seen[m], "no event stored before the kill is lost"
                    assert frames[-1]["event"] == "stream_end" and frames[-1]["data"]["finish_reason"] == "Error"
                    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
                assert time.monotonic() - killed_at < LEASE_S + 3
                for m in ids:
                    assert wait_status(cb, m, TERMINAL, timeout=20)["status"] in ("completed", "error")
                statuses = [cb.get(f"/v1/messages/async/{m}/status").json()["status"] for m in ids]
                assert statuses.count("completed") == 16 and statuses.count("error") == 4
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_finished_runs_survive_restarting_every_replica(
    replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream
) -> None:
    a, b = replicas
    fake.script("gpt-up", [Reply(tokens=["keep", " me"])])
    with a.client() as ca:
        mid = start(ca)
        wait_status(ca, mid, {"completed"})
        before = watch(ca, mid)
    a.kill()
    b.kill()
    a.start()
    b.start()
    with b.client() as cb:
        assert watch(cb, mid) == before
        assert cb.get(f"/v1/messages/async/{mid}/status").json()["status"] == "completed"


def test_sync_messages_work_on_redis_replicas(
    replicas: tuple[ServerProcess, ServerProcess], fake: FakeUpstream
) -> None:
    a, _ = replicas
    fake.script("gpt-up", [Reply(tokens=["sync"])])
    with a.client() as ca:
        resp = ca.post("/v1/messages", json={"model": "gpt", "max_tokens": 4, "messages": USER})
        assert resp.status_code == 200 and resp.json()["content"] == [{"type": "text", "text": "sync"}]


def test_tenant_limits_hold_across_replicas(fake: FakeUpstream, tmp_path: Path) -> None:
    prefix = f"bsrep-{uuid.uuid4().hex[:8]}"
    config = {**replica_config(fake, prefix), "limits": {"tenant_default": {"max_active_runs": 2}}}
    a = ServerProcess(tmp_path, config, name="limit-a").start()
    b = ServerProcess(tmp_path, config, name="limit-b").start()
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(200)], delay=0.05)])
    try:
        with a.client() as ca, b.client() as cb:
            first, second = start(ca), start(cb)
            resp = ca.post("/v1/messages/async", json={"model": "gpt", "messages": USER})
            assert resp.status_code == 429 and resp.headers["retry-after"]
            assert cb.post("/v1/messages", json={"model": "gpt", "messages": USER}).status_code == 429, (
                "sync runs count too"
            )
            assert cb.post(f"/v1/messages/async/{first}/cancel").status_code == 200
            third = start(cb)
            for mid in (second, third):
                cb.post(f"/v1/messages/async/{mid}/cancel")
    finally:
        a.stop()
        b.stop()
