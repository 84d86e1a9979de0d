"""Randomised fault runs: the long version of tests/test_faults.py, with timings.

Each iteration starts real server processes (SQLite, or two replicas on a Redis of
its own), starts runs against the fake upstream, injects one fault at a random moment,
then checks every run: terminal, log 1..K with one stream_end last, status agreeing
with the log. It prints, per fault, the time from the fault to the last run's terminal
status (p50 and max) and the number of invariant violations (must be 0).

    python bench/faults.py                 # 5 iterations of each fault, a few minutes
    python bench/faults.py --iterations 1  # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.own_redis import OwnRedis  # noqa: E402
from tests.support.replicas import LEASE_S, replica, sqlite_server  # noqa: E402
from tests.support.runs import TERMINAL, check_run, slow, start, wait_events  # noqa: E402

RUNS = 4


def all_terminal(client: Any, ids: list[str], timeout: float) -> float:
    """Seconds until every run is terminal (polled every 20 ms)."""
    began = time.monotonic()
    for mid in ids:
        while client.get(f"/v1/messages/async/{mid}/status").json().get("status") not in TERMINAL:
            if time.monotonic() - began > timeout:
                raise AssertionError(f"run {mid} not terminal after {timeout} s")
            time.sleep(0.02)
    return time.monotonic() - began


def sqlite_kill9(fake: FakeUpstream, tmp: Path) -> float:
    srv = sqlite_server(fake, tmp, name="bench-sqlite").start()
    try:
        fake.script("gpt-up", slow(random.randint(5, 120), 0.01))
        with srv.client() as c:
            ids = [start(c) for _ in range(RUNS)]
            time.sleep(random.uniform(0, 1.0))  # the fault lands anywhere: before, during or after the runs
        srv.kill()
        killed = time.monotonic()
        srv.start()
        with srv.client() as c:
            all_terminal(c, ids, 15)
            took = time.monotonic() - killed
            for mid in ids:
                check_run(c, mid)
        return took
    finally:
        srv.stop()


def _two_replicas(fake: FakeUpstream, tmp: Path, url: str | None = None) -> tuple[Any, Any, list[str]]:
    prefix = f"bsbench-{uuid.uuid4().hex[:8]}"
    kw = {"url": url} if url else {}
    a = replica(fake, tmp, prefix, "bench-a", **kw).start()
    fake.script("gpt-up", slow(random.randint(40, 200), 0.02))
    with a.client() as ca:
        ids = [start(ca) for _ in range(RUNS)]
        wait_events(ca, ids[0], 2)
    b = replica(fake, tmp, prefix, "bench-b", **kw).start()
    time.sleep(random.uniform(0, 1.0))
    return a, b, ids


def replica_kill9(fake: FakeUpstream, tmp: Path) -> float:
    a, b, ids = _two_replicas(fake, tmp)
    try:
        a.kill()
        with b.client() as cb:
            took = all_terminal(cb, ids, LEASE_S + 10)
            for mid in ids:
                check_run(cb, mid)
        return took
    finally:
        a.stop()
        b.stop()


def replica_pause(fake: FakeUpstream, tmp: Path) -> float:
    a, b, ids = _two_replicas(fake, tmp)
    try:
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            with b.client() as cb:
                took = all_terminal(cb, ids, LEASE_S + 10)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        with a.client() as ca, b.client() as cb:
            for mid in ids:
                assert check_run(ca, mid) == check_run(cb, mid)
        return took
    finally:
        a.stop()
        b.stop()


def redis_restart(fake: FakeUpstream, tmp: Path) -> float:
    own = OwnRedis(tmp).start()
    a = b = None
    try:
        a, b, ids = _two_replicas(fake, tmp, own.url)
        own.kill()
        time.sleep(random.uniform(0.2, 2.0))  # the outage's length
        own.start()
        restarted = time.monotonic()
        with b.client() as cb:
            all_terminal(cb, ids, LEASE_S + 30)
            took = time.monotonic() - restarted
            for mid in ids:
                check_run(cb, mid)
        return took
    finally:
        for srv in (a, b):
            if srv is not None:
                srv.stop()
        own.kill()


def replica_sigterm(fake: FakeUpstream, tmp: Path) -> float:
    a, b, ids = _two_replicas(fake, tmp)
    try:
        stopped = time.monotonic()
        a.stop()  # SIGTERM: a graceful stop; returns once A has exited
        with b.client() as cb:
            all_terminal(cb, ids, 15)
            took = time.monotonic() - stopped
            for mid in ids:
                check_run(cb, mid)
        return took
    finally:
        b.stop()


FAULTS: dict[str, Callable[[FakeUpstream, Path], float]] = {
    "kill -9 (SQLite, then restart)": sqlite_kill9,
    "kill -9 of the owning replica": replica_kill9,
    "SIGSTOP of the owning replica past its lease": replica_pause,
    "Redis killed, restarted (from restart)": redis_restart,
    "SIGTERM of the owning replica": replica_sigterm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", default="", help="run only the faults whose name contains this text")
    args = parser.parse_args()
    random.seed(args.seed)
    results: dict[str, dict[str, Any]] = {}
    with FakeUpstream() as fake:
        for name, fault in FAULTS.items():
            if args.only not in name:
                continue
            times, failures = [], 0
            for _ in range(args.iterations):
                fake.reset()
                with tempfile.TemporaryDirectory(prefix="bs-faults-") as tmp:
                    try:
                        times.append(fault(fake, Path(tmp)))
                    except Exception:
                        failures += 1
                        traceback.print_exc()
            results[name] = {
                "iterations": args.iterations,
                "p50_s": round(statistics.median(times), 2) if times else None,
                "max_s": round(max(times), 2) if times else None,
                "violations": failures,
            }
            print(
                f"{name:48} p50 {results[name]['p50_s']} s  max {results[name]['max_s']} s  violations {failures}",
                flush=True,
            )
    print(f"(lease_s = {LEASE_S}: a takeover starts at most lease_s + lease_s/3 after the last renewal)")
    print("RESULT " + json.dumps(results))
    if any(r["violations"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
