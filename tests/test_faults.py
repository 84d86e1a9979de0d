"""Faults: whatever dies, every run ends once, through every replica, in bounded time.

Real processes only: `backstream serve` on a real SQLite file or a real Redis (the
suite's database, or a `redis-server` of a test's own that it kills and restarts),
killed with SIGKILL, paused with SIGSTOP, stopped with SIGTERM. After each fault:
every run is terminal within the lease plus a few seconds, every log is 1..K with one
`stream_end` last, the status agrees with the log, every watcher received an exact
slice of the final log, and nothing answered 500.
"""

from __future__ import annotations

import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.own_redis import OwnRedis
from tests.support.replicas import LEASE_S, replica, sqlite_server
from tests.support.runs import TERMINAL, USER, Watcher, check_run, slow, start, wait_events, wait_status, watch_first
from tests.support.server import ServerProcess
from tests.support.sse import parse_sse

TENANT = "default"  # runs started without auth belong to this tenant


def no_500(server: ServerProcess) -> None:
    text = server.log_path.read_text(errors="replace")
    assert "Task exception was never retrieved" not in text
    assert " 500 " not in text and "internal server error" not in text.lower()


# --- the embedded store -------------------------------------------------------------------


def test_kill_between_stream_end_and_status_keeps_one_stream_end(fake: FakeUpstream, tmp_path: Path) -> None:
    """A kill -9 after the stream_end commit but before the status commit: recovery only finishes the status."""
    srv = sqlite_server(fake, tmp_path).start()
    fake.script("gpt-up", [Reply(tokens=["a", "b"])])
    with srv.client() as c:
        mid = start(c)
        before = check_run(c, mid)
    srv.kill()
    # The state that kill leaves behind, written into the real file: the log ends, the status does not.
    db = sqlite3.connect(tmp_path / "faults-sqlite-data" / "backstream.db")
    db.execute(
        "UPDATE runs SET status = 'processing', completed_at = NULL, expires_at = NULL WHERE message_id = ?", (mid,)
    )
    db.commit()
    db.close()
    srv.start()
    try:
        with srv.client() as c:
            after = check_run(c, mid)
            assert after == before and after[-1]["data"]["finish_reason"] == "Stop"
            assert c.get(f"/v1/messages/async/{mid}/status").json()["status"] == "completed"
    finally:
        srv.stop()


@pytest.mark.parametrize("kill_after", [1, 4, 25])
def test_kill_9_sqlite_mid_run_then_restart(fake: FakeUpstream, tmp_path: Path, kill_after: int) -> None:
    srv = sqlite_server(fake, tmp_path).start()
    fake.script("gpt-up", slow(200, 0.01))
    with srv.client() as c:
        ids = [start(c) for _ in range(3)]
        seen = watch_first(c, ids[0], kill_after)
    srv.kill()
    srv.start()
    try:
        with srv.client() as c:
            for mid in ids:
                frames = check_run(c, mid, timeout=15)
                if mid == ids[0]:
                    assert frames[:kill_after] == seen, "nothing a watcher saw is lost"
        no_500(srv)
    finally:
        srv.stop()


def test_sigterm_ends_runs_for_their_watchers_and_keeps_queued_ones(fake: FakeUpstream, tmp_path: Path) -> None:
    """Graceful stop: running runs end with stream_end that watchers receive; runs not started stay
    queued (their watchers get a clean close, to resume after the restart); exit within the grace."""
    srv = sqlite_server(fake, tmp_path, name="faults-term", shutdown_grace_s=5).start()
    fake.script("gpt-one-up", [slow(400, 0.02), Reply(tokens=["later"])])
    with srv.client() as c:
        running = start(c, model="gpt-one")
        queued = start(c, model="gpt-one")  # max_concurrency 1: waits for the first
        w_running = Watcher(srv.url, running)
        wait_events(c, running, 5)
        w_queued_status = c.get(f"/v1/messages/async/{queued}/status").json()["status"]
        assert w_queued_status == "pending"
    with srv.client() as c, c.stream("GET", f"/v1/messages/async/{queued}/stream") as resp:
        assert resp.status_code == 200  # the server serves this watcher now: nothing to read yet
        assert srv.proc is not None
        stopped_at = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert parse_sse(resp.read()) == [], "a clean close without events: the client resumes"
        srv.proc.wait(10)
        took = time.monotonic() - stopped_at
    w_running.join()
    assert took < 5 + 1, f"exited within the grace period ({took:.1f} s)"
    assert w_running.clean and w_running.frames[-1]["event"] == "stream_end"
    assert w_running.frames[-1]["data"]["error"]["message"].startswith("the server shut down")
    log = srv.log_path.read_text()
    assert "Traceback" not in log
    srv.start()
    try:
        with srv.client() as c:
            assert check_run(c, running) == w_running.frames
            assert check_run(c, queued, timeout=15)[-1]["data"]["finish_reason"] == "Stop"
    finally:
        srv.stop()


# --- replicas on Redis -------------------------------------------------------------------------


@pytest.fixture()
def prefix(redis_db: str) -> str:
    """A key prefix of a replica group's own in the suite's Redis database."""
    return f"bsfault-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def rdb(redis_db: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_db)
    yield client
    client.close()


def meta_key(prefix: str, mid: str) -> str:
    return f"{prefix}:run:{{{TENANT}/{mid}}}:meta"


def test_takeover_by_a_replica_that_watched_the_run(fake: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    """B's in-memory position for R is behind (its watcher left); taking R over must append after the real end."""
    a = replica(fake, tmp_path, prefix, "take-a").start()
    b = None
    try:
        fake.script("gpt-up", slow(400, 0.02))
        with a.client() as ca:
            mid = start(ca)  # only A is up: A executes it
            wait_events(ca, mid, 2)
        b = replica(fake, tmp_path, prefix, "take-b").start()
        with a.client() as ca, b.client() as cb:
            watch_first(cb, mid, 3)  # B follows R a little, then its watcher leaves
            live = Watcher(b.url, mid)  # and one that stays
            wait_events(ca, mid, 20)
        a.kill()
        killed = time.monotonic()
        with b.client() as cb:
            frames = check_run(cb, mid, timeout=LEASE_S + 5)
            assert time.monotonic() - killed < LEASE_S + 3
            assert frames[-1]["data"]["error"]["message"] == "the replica running this run stopped"
            resp = cb.post(f"/v1/messages/async/{mid}/cancel")
            assert resp.status_code == 409 and resp.json()["error"]["details"][0]["message"] == "error"
        live.join()
        assert live.clean and live.frames == frames, "the watcher on B saw the whole log, ending once"
        no_500(b)
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_one_failed_takeover_does_not_strand_the_others(
    fake: FakeUpstream, tmp_path: Path, prefix: str, rdb: redis.Redis
) -> None:
    a = replica(fake, tmp_path, prefix, "reap-a").start()
    b = None
    try:
        fake.script("gpt-up", slow(400, 0.02))
        with a.client() as ca:
            ids = [start(ca) for _ in range(3)]
            for mid in ids:
                wait_events(ca, mid, 2)
        a.kill()
        # One run's record cannot be read (a field that is not a number): its takeover fails.
        broken = ids[0]
        rdb.hset(meta_key(prefix, broken), "priority", "not-a-number")
        b = replica(fake, tmp_path, prefix, "reap-b").start()
        with b.client() as cb:
            for mid in ids[1:]:
                check_run(cb, mid, timeout=LEASE_S + 5)
            assert rdb.zscore(f"{prefix}:running:{{gpt}}", f"{TENANT}/{broken}") is not None, (
                "its lease is kept for a retry"
            )
            rdb.hset(meta_key(prefix, broken), "priority", "0")
            check_run(cb, broken, timeout=2 * LEASE_S + 5)
            assert rdb.zcard(f"{prefix}:running:{{gpt}}") == 0
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_log_that_ended_is_finished_by_the_takeover(
    fake: FakeUpstream, tmp_path: Path, prefix: str, rdb: redis.Redis
) -> None:
    """A replica that died (or paused) after its stream_end but before the status: the takeover only finishes the status."""
    a = replica(fake, tmp_path, prefix, "ended-a").start()
    try:
        fake.script("gpt-up", [Reply(tokens=["x", "y"])])
        with a.client() as ca:
            mid = start(ca)
            before = check_run(ca, mid)
            rdb.hset(meta_key(prefix, mid), mapping={"status": "processing", "completed_at": "", "expires_at": ""})
            rdb.zadd(f"{prefix}:running:{{gpt}}", {f"{TENANT}/{mid}": 1})  # a lease that expired long ago
            after = check_run(ca, mid, timeout=LEASE_S + 5)
            assert after == before
            assert ca.get(f"/v1/messages/async/{mid}/status").json()["status"] == "completed"
    finally:
        a.stop()


def test_paused_replica_resumes_fenced_out_and_serves_the_real_log(
    fake: FakeUpstream, tmp_path: Path, prefix: str
) -> None:
    a = replica(fake, tmp_path, prefix, "zombie-a").start()
    b = None
    try:
        fake.script("gpt-up", slow(400, 0.02))
        with a.client() as ca:
            mid = start(ca)
            wait_events(ca, mid, 3)
        b = replica(fake, tmp_path, prefix, "zombie-b").start()
        on_a, on_b = Watcher(a.url, mid), Watcher(b.url, mid)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            with b.client() as cb:
                final = check_run(cb, mid, timeout=LEASE_S + 5)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        on_a.join(), on_b.join()
        for w in (on_a, on_b):
            assert w.clean and w.frames == final, "each watcher got the real log, ending with its one stream_end"
        with a.client() as ca, b.client() as cb:
            assert check_run(ca, mid) == final == check_run(cb, mid), "the resumed replica wrote nothing more"
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_cancel_racing_a_takeover_tells_the_truth(fake: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    a = replica(fake, tmp_path, prefix, "race-a").start()
    b = None
    try:
        fake.script("gpt-up", slow(400, 0.02))
        with a.client() as ca:
            mid = start(ca)
            wait_events(ca, mid, 3)
        b = replica(fake, tmp_path, prefix, "race-b").start()
        a.kill()
        with b.client() as cb:
            resp = cb.post(f"/v1/messages/async/{mid}/cancel")  # A cannot answer; the reaper ends R meanwhile
            final = wait_status(cb, mid, TERMINAL)["status"]
            if resp.status_code == 200:
                assert final == "cancelled"
            else:
                assert resp.status_code == 409 and final != "cancelled"
                assert resp.json()["error"]["details"][0]["message"] == final
            check_run(cb, mid)
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_sigterm_hands_unstarted_runs_to_a_peer_at_once(fake: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    lease = 20.0  # long: the peer must not wait for the lease to expire
    a = replica(fake, tmp_path, prefix, "handover-a", lease_s=lease).start()
    b = None
    try:
        fake.script("gpt-up", [Reply(tokens=["late"], ttft=30.0), Reply(tokens=["on", " b"])])
        with a.client() as ca:
            mid = start(ca)
            fake.wait_for_requests(1)  # A executes it and waits for the first token
        b = replica(fake, tmp_path, prefix, "handover-b", lease_s=lease).start()
        stopping = time.monotonic()
        a.stop()
        stopped = time.monotonic()
        assert stopped - stopping < 3, f"A exited promptly ({stopped - stopping:.1f} s), its loops stopped at once"
        with b.client() as cb:
            frames = check_run(cb, mid, timeout=8)
            assert time.monotonic() - stopped < 5
            assert frames[-1]["data"]["finish_reason"] == "Stop" and frames[0]["event"] == "stream_start"
        assert "Traceback" not in a.log_path.read_text()
    finally:
        a.stop()
        if b is not None:
            b.stop()


# --- Redis itself dies ------------------------------------------------------------------------------


def test_redis_down_at_the_first_status_write_never_completes_an_empty_log(
    fake: FakeUpstream, tmp_path: Path, prefix: str
) -> None:
    own = OwnRedis(tmp_path).start()
    srv = None
    try:
        srv = replica(fake, tmp_path, prefix, "blip", url=own.url).start()
        fake.script("gpt-up", [Reply(tokens=["a", "b", "c"], ttft=1.0)])
        with srv.client() as c:
            mid = start(c)
            fake.wait_for_requests(1)
            own.kill()  # the run's first status write (at its first token) meets a dead Redis
            fake.wait_for_finish(fake.requests[-1], timeout=5)
            own.start()
            frames = check_run(c, mid, timeout=10)  # a status that agrees with a log that ends once
            assert frames[-1]["data"]["finish_reason"] in ("Stop", "Error")
        assert "Task exception was never retrieved" not in srv.log_path.read_text()
    finally:
        if srv is not None:
            srv.stop()
        own.kill()


def test_redis_outage_answers_503_and_recovers_promptly(fake: FakeUpstream, tmp_path: Path, prefix: str) -> None:
    own = OwnRedis(tmp_path).start()
    srv = None
    try:
        srv = replica(fake, tmp_path, prefix, "outage", url=own.url).start()
        fake.script("gpt-up", [Reply(tokens=["a", "b", "c"])])
        with srv.client() as c:
            mid = start(c)
            check_run(c, mid)
            own.kill()
            for method, path in (
                ("POST", "/v1/messages/async"),
                ("GET", f"/v1/messages/async/{mid}/status"),
                ("GET", f"/v1/messages/async/{mid}/stream"),
            ):
                resp = c.request(method, path, json={"model": "gpt", "messages": USER} if method == "POST" else None)
                assert resp.status_code == 503, (path, resp.text)
                body = resp.json()
                assert (
                    resp.headers["retry-after"] and body["error"]["type"] == "overloaded_error" and body["request_id"]
                )
            own.start()
            back = time.monotonic()
            while c.get(f"/v1/messages/async/{mid}/status").status_code != 200:
                assert time.monotonic() - back < 3, "answers again promptly after Redis is back"
                time.sleep(0.05)
            fake.script("gpt-up", [Reply(tokens=["ok"])])
            assert check_run(c, start(c))[-1]["data"]["finish_reason"] == "Stop"
        no_500(srv)
    finally:
        if srv is not None:
            srv.stop()
        own.kill()
