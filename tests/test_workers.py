"""`backstream serve --workers N`: several server processes behind one socket (issue 13 point 4).

With the Redis store the workers are simply replicas: a run started through one
connection is watched through others whichever worker answers. The parent only
supervises: it replaces a worker that dies and passes SIGTERM on so every worker drains.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.replicas import replica_config
from tests.support.runs import start, wait_status, watch
from tests.support.server import ServerProcess
from tests.test_ops_startup import assert_clean_failure, serve

pytestmark = pytest.mark.usefixtures("redis_db")


def workers_of(srv: ServerProcess, count: int, timeout: float = 20) -> list[psutil.Process]:
    """The supervisor's worker processes, once there are `count` of them (a replacement takes a moment to fork)."""
    assert srv.proc is not None
    parent = psutil.Process(srv.proc.pid)
    deadline = time.monotonic() + timeout
    while True:
        children = [c for c in parent.children() if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        if len(children) == count or time.monotonic() > deadline:
            return children
        time.sleep(0.05)


@pytest.fixture()
def two_workers(fake: FakeUpstream, tmp_path: Path) -> Iterator[ServerProcess]:
    config = {**replica_config(fake, f"bswork-{uuid.uuid4().hex[:8]}"), "workers": 2}
    srv = ServerProcess(tmp_path, config, name="workers").start()
    yield srv
    srv.stop()


def test_workers_share_the_port_and_the_runs(two_workers: ServerProcess, fake: FakeUpstream) -> None:
    workers = workers_of(two_workers, 2)
    assert len(workers) == 2
    listening = {w.pid for w in workers if any(c.status == "LISTEN" for c in w.net_connections())}
    assert listening == {w.pid for w in workers}, "both workers accept on the one socket"
    fake.script("gpt-up", [Reply(tokens=[f"t{i} " for i in range(30)], delay=0.005)])
    mids = []
    for _ in range(6):  # fresh connections: the kernel hands them to either worker
        with two_workers.client() as c:
            mids.append(start(c))

    def watched(mid: str) -> list[int]:
        with two_workers.client() as c:
            return [f["id"] for f in watch(c, mid)]

    with ThreadPoolExecutor(6) as pool:
        seen = list(pool.map(watched, mids * 2))
    for ids in seen:
        assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 30
    with two_workers.client() as c:
        assert all(wait_status(c, m, {"completed"})["status"] == "completed" for m in mids)


def test_a_dead_worker_is_replaced_and_sigterm_stops_all(two_workers: ServerProcess) -> None:
    first = workers_of(two_workers, 2)
    first[0].send_signal(signal.SIGKILL)
    first[0].wait(5)
    replaced = workers_of(two_workers, 2)
    assert len(replaced) == 2 and first[0].pid not in {w.pid for w in replaced}
    for _ in range(4):
        assert httpx.get(two_workers.url + "/healthz", timeout=5).status_code == 200
    assert two_workers.proc is not None
    two_workers.proc.send_signal(signal.SIGTERM)
    assert two_workers.proc.wait(15) == 0
    gone = psutil.wait_procs(replaced, timeout=5)[1]
    assert not gone, "every worker exits with the supervisor"


def test_workers_need_redis(tmp_path: Path) -> None:
    assert_clean_failure(serve(tmp_path, "--workers", "2"), "workers: 2", "store: redis")
