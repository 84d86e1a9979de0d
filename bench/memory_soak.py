"""Memory soak: server RSS while thousands of background runs finish, printed as a slope.

The bench starts the fake upstream and one Backstream server (store sqlite by default,
one openai model `fake` pointing at the fake, no max_concurrency), then runs --runs
background runs (default 10,000) of --tokens tokens (default 64), at most --concurrency
(default 64) at a time. Each run is started with POST /v1/messages/async and watched to
its end by one watcher (GET …/stream, replay from 0 then live), like a real client; the
watcher checks it got ids 1..n ending with stream_end. After every --every finished runs
(default 1,000) the server's RSS is read. The table shows each checkpoint, then the
slope (KB per finished run, least squares over the checkpoints) and the final RSS against
the goal (< 200 MB after 10,000 runs).

    python bench/memory_soak.py                         # 10,000 runs, about 2 minutes on 2 cores
    python bench/memory_soak.py --runs 2000 --every 500 # quicker
    python bench/memory_soak.py --heap 25               # also heap snapshots (tracemalloc, 25 frames)
    python bench/memory_soak.py --src /tmp/base/src     # measure another checkout's server

`--heap N` runs the server with a bench-only `sitecustomize` (on PYTHONPATH, in a temp dir:
nothing in the product changes) that starts tracemalloc with N frames and dumps a snapshot,
plus gc object counts, when it receives SIGUSR1. The bench signals it at the first and the
last checkpoint and prints what grew in between (by line, then by traceback), so the
growth per run can be pinned on the code that allocated it. tracemalloc slows the server
down and costs memory itself: take RSS numbers from a run without it.

The last line is `RESULT {json}`. Exit status 1 when a run failed or a watcher lost events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402

from _common import (  # noqa: E402
    HOST,
    FakeUpstreamProcess,
    ServerProcess,
    fmt,
    make_work_dir,
    peak_rss_mb,
    proc_cpu_s,
    raise_fd_limit,
    rss_mb,
    source_version,
    table,
)
from async_fanout import FRAME_RE, Conn, HttpError, _read_head, run_async  # noqa: E402

GOAL_RUNS, GOAL_MB = 10_000, 200.0

# Installed only into the server this bench starts (PYTHONPATH), never into the product.
_SITECUSTOMIZE = """
import gc, json, os, signal, sys, time, tracemalloc
from collections import Counter

_dir = os.environ.get("BSBENCH_HEAP_DIR")
if _dir:
    tracemalloc.start(int(os.environ.get("BSBENCH_HEAP_FRAMES", "25")))
    _seq = [0]

    def _dump(signum, frame):
        _seq[0] += 1
        t0 = time.perf_counter()
        gc.collect()
        base = os.path.join(_dir, "heap-%03d" % _seq[0])
        snap = tracemalloc.take_snapshot()
        snap.dump(base + ".snap.tmp")
        types = Counter(type(o).__qualname__ for o in gc.get_objects())
        traced, peak = tracemalloc.get_traced_memory()
        info = {
            "traced": traced,
            "traced_peak": peak,
            "blocks": sys.getallocatedblocks(),
            "gc_objects": sum(types.values()),
            "types": dict(types.most_common(60)),
            "dump_s": time.perf_counter() - t0,
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(info, f)
        os.replace(base + ".snap.tmp", base + ".snap")
        os.replace(base + ".json.tmp", base + ".json")

    signal.signal(signal.SIGUSR1, _dump)
"""


# ------------------------------------------------------------------ the server under test


@contextlib.contextmanager
def child_env(extra: dict[str, str]) -> Iterator[None]:
    """Variables for the next child process only (ServerProcess copies os.environ when it spawns)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def server_config(store: str, fake_port: int, spec: str) -> str:
    return (
        f"store: {store}\n"
        "log_level: warning\n"
        "runs: {queue_limit: 100000}\n"
        "models:\n"
        f'  - {{name: fake, provider: openai, base_url: "http://{HOST}:{fake_port}/v1", model: "{spec}", '
        "retries: 0, timeout_s: 120}\n"
    )


class Heap:
    """Asks the server for heap snapshots (SIGUSR1 to the bench-only sitecustomize) and compares them."""

    def __init__(self, pid: int, directory: Path) -> None:
        self.pid = pid
        self.dir = directory
        self.taken: list[tuple[int, Path]] = []  # (finished runs, snapshot path)

    def snapshot(self, finished: int, timeout: float = 120.0) -> None:
        n = len(self.taken) + 1
        path = self.dir / f"heap-{n:03d}.snap"
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.with_suffix(".json").exists()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server wrote no heap snapshot within {timeout} s")
            time.sleep(0.05)
        self.taken.append((finished, path))

    def report(self, top: int) -> dict[str, Any]:
        import tracemalloc

        if len(self.taken) < 2:
            return {}
        (n0, p0), (n1, p1) = self.taken[0], self.taken[-1]
        runs = max(1, n1 - n0)
        first, last = tracemalloc.Snapshot.load(str(p0)), tracemalloc.Snapshot.load(str(p1))
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        first, last = first.filter_traces(filters), last.filter_traces(filters)
        info0 = json.loads(p0.with_suffix(".json").read_text())
        info1 = json.loads(p1.with_suffix(".json").read_text())
        print(f"\nheap: snapshots after {n0} and {n1} finished runs ({runs} runs apart)")
        print(
            f"  traced {info0['traced'] / 2**20:.1f} -> {info1['traced'] / 2**20:.1f} MB "
            f"({(info1['traced'] - info0['traced']) / runs / 1024:+.2f} KB/run); "
            f"gc objects {info0['gc_objects']} -> {info1['gc_objects']}"
        )
        by_line = last.compare_to(first, "lineno")[:top]
        rows = [[f"{s.size_diff / runs:+.0f}", f"{s.count_diff / runs:+.2f}", str(s.traceback[0])] for s in by_line]
        print(table(["B/run", "blocks/run", "allocated at (line)"], rows, "rrl"))
        grown = sorted(
            ((name, info1["types"].get(name, 0) - info0["types"].get(name, 0)) for name in info1["types"]),
            key=lambda kv: -kv[1],
        )[:top]
        print(table(["gc type", "objects/run"], [[n, f"{d / runs:+.2f}"] for n, d in grown if d > 0], "lr"))
        print("\ntop allocation sites by traceback (most recent frame last):")
        for s in last.compare_to(first, "traceback")[: min(top, 8)]:
            print(f"  {s.size_diff / runs:+.0f} B/run, {s.count_diff / runs:+.2f} blocks/run")
            for line in s.traceback.format(limit=12):
                print("    " + line)
        return {
            "runs_apart": runs,
            "traced_kb_per_run": (info1["traced"] - info0["traced"]) / runs / 1024,
            "top_lines": [
                {
                    "site": str(s.traceback[0]),
                    "bytes_per_run": s.size_diff / runs,
                    "blocks_per_run": s.count_diff / runs,
                }
                for s in by_line
            ],
            "gc_types_per_run": {n: d / runs for n, d in grown if d > 0},
        }


# ------------------------------------------------------------------ the client


async def watch(port: int, message_id: str) -> tuple[int, str]:
    """One watcher: replay from 0 and follow to the end. Returns (events, error or "")."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    try:
        writer.write(
            f"GET /v1/messages/async/{message_id}/stream HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode("latin-1")
        )
        buf = bytearray()
        status, head = await _read_head(reader, buf)
        if status != 200 or b"transfer-encoding: chunked" not in head:
            return 0, f"watch: HTTP {status}"
        while not buf.endswith(b"\r\n0\r\n\r\n"):  # SSE data never holds a CR: this is the last chunk
            data = await reader.read(1 << 16)
            if not data:
                return 0, "watch: connection closed before the final chunk"
            buf += data
        frames = FRAME_RE.findall(dechunk(bytes(buf)))
        ids = [int(i) for i, _ in frames]
        if ids != list(range(1, len(ids) + 1)):
            return len(ids), "watch: ids are not 1..n"
        if not frames or frames[-1][1] != b"stream_end":
            return len(ids), "watch: no stream_end"
        return len(ids), ""
    finally:
        writer.transport.abort()


def dechunk(raw: bytes) -> bytes:
    out: list[bytes] = []
    pos = 0
    while True:
        j = raw.index(b"\r\n", pos)
        size = int(raw[pos:j].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[j + 2 : j + 2 + size])
        pos = j + 4 + size


class Soak:
    def __init__(self, args: argparse.Namespace, server: ServerProcess, heap: Heap | None) -> None:
        self.args = args
        self.server = server
        self.heap = heap
        self.body = orjson.dumps(
            {"model": "fake", "max_tokens": args.tokens + 16, "messages": [{"role": "user", "content": "hi"}]}
        )
        self.next = 0
        self.finished = 0
        self.events = 0
        self.errors: dict[str, int] = {}
        self.points: list[tuple[int, float, float]] = []  # (finished runs, RSS MB, seconds since start)
        self.t0 = time.perf_counter()

    def checkpoint(self) -> None:
        rss = rss_mb(self.server.pid)
        self.points.append((self.finished, rss, time.perf_counter() - self.t0))
        print(f"  {self.finished:>6} runs  RSS {rss:7.1f} MB  {time.perf_counter() - self.t0:6.1f} s", flush=True)
        if self.heap is not None and (self.finished == self.args.every or self.finished >= self.args.runs):
            self.heap.snapshot(self.finished)

    async def one(self, conn: Conn) -> None:
        status, payload = await conn.request("POST", "/v1/messages/async", self.body)
        if status != 200:
            raise HttpError(f"POST: HTTP {status}: {payload[:120]!r}")
        n, error = await watch(self.server.port, orjson.loads(payload)["message_id"])
        if error:
            raise HttpError(error)
        self.events += n

    async def worker(self) -> None:
        conn = Conn(self.server.port)
        try:
            while self.next < self.args.runs:
                self.next += 1
                try:
                    await self.one(conn)
                except (HttpError, ConnectionError, OSError, ValueError, KeyError) as exc:
                    conn.close()
                    reason = str(exc)[:120]
                    self.errors[reason] = self.errors.get(reason, 0) + 1
                self.finished += 1
                if self.finished % self.args.every == 0 or self.finished == self.args.runs:
                    self.checkpoint()
        finally:
            conn.close()

    async def run(self) -> None:
        await asyncio.gather(*(self.worker() for _ in range(self.args.concurrency)))


def slope_kb_per_run(points: list[tuple[int, float, float]]) -> float:
    """Least-squares slope of RSS over finished runs, in KB per run."""
    if len(points) < 2:
        return float("nan")
    xs = [p[0] for p in points]
    ys = [p[1] * 1024 for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10_000)
    p.add_argument("--every", type=int, default=1_000, help="RSS checkpoint every this many finished runs")
    p.add_argument("--concurrency", type=int, default=64, help="runs in flight (each with its one watcher)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--delay-ms", type=float, default=1.0, help="the fake's pause between tokens")
    p.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    p.add_argument("--settle", type=float, default=0.0, help="seconds to wait after the last run, then read RSS again")
    p.add_argument("--heap", type=int, default=0, metavar="FRAMES", help="tracemalloc with this many frames")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--src", type=Path, help="serve this src/ directory instead (e.g. a worktree of another commit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    work = make_work_dir("bs-memsoak-")
    spec = f"tokens={args.tokens};delay_ms={args.delay_ms:g}"
    env: dict[str, str] = {}
    paths = []
    if args.src is not None:
        paths.append(str(args.src.resolve()))
    heap_dir = work / "heap"
    if args.heap:
        heap_dir.mkdir()
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        paths.append(str(work / "site"))
        env.update(BSBENCH_HEAP_DIR=str(heap_dir), BSBENCH_HEAP_FRAMES=str(args.heap))
    if paths:
        env["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    version = f"src={args.src}" if args.src else source_version()
    print(
        f"memory_soak: {version} store={args.store} runs={args.runs} tokens={args.tokens} "
        f"concurrency={args.concurrency} heap={args.heap or 'off'}  (work dir {work})",
        flush=True,
    )
    fake = FakeUpstreamProcess(work).start()
    server = ServerProcess(work, server_config(args.store, fake.port, spec))
    result: dict[str, Any] = {}
    try:
        with child_env(env):
            server.start(timeout=180.0 if args.heap else 30.0)
        time.sleep(0.5)
        idle = rss_mb(server.pid)
        print(f"  {0:>6} runs  RSS {idle:7.1f} MB  (idle after start-up)", flush=True)
        heap = Heap(server.pid, heap_dir) if args.heap else None
        soak = Soak(args, server, heap)
        cpu0 = proc_cpu_s(server.pid)
        gc.freeze()
        run_async(soak.run())
        wall = time.perf_counter() - soak.t0
        cpu = proc_cpu_s(server.pid) - cpu0
        settled = None
        if args.settle:
            time.sleep(args.settle)
            settled = rss_mb(server.pid)
        peak = peak_rss_mb(server.pid)
        slope = slope_kb_per_run(soak.points)
        final = soak.points[-1][1] if soak.points else float("nan")
        heap_report = heap.report(args.top) if heap is not None else {}
        result = {
            "version": version,
            "store": args.store,
            "runs": args.runs,
            "tokens": args.tokens,
            "concurrency": args.concurrency,
            "heap_frames": args.heap,
            "rss_idle_mb": idle,
            "checkpoints": [{"runs": n, "rss_mb": r, "t_s": t} for n, r, t in soak.points],
            "slope_kb_per_run": slope,
            "rss_final_mb": final,
            "rss_settled_mb": settled,
            "rss_peak_mb": peak,
            "wall_s": wall,
            "runs_per_s": soak.finished / wall if wall else None,
            "server_cpu_ms_per_run": 1000 * cpu / max(1, soak.finished),
            "events": soak.events,
            "errors": soak.errors,
            "heap": heap_report,
        }
    finally:
        server.stop()
        fake.stop()
    goal_applies = args.runs >= GOAL_RUNS and not args.heap
    print()
    rows = [
        ["RSS idle after start-up (MB)", fmt(result["rss_idle_mb"], 1), "", ""],
        [
            f"RSS after {args.runs} finished runs (MB)",
            fmt(result["rss_final_mb"], 1),
            f"< {GOAL_MB:g}",
            ("yes" if result["rss_final_mb"] < GOAL_MB else "NO") if goal_applies else "-",
        ],
        ["slope (KB per finished run)", fmt(result["slope_kb_per_run"], 2), "", ""],
        ["RSS peak (MB)", fmt(result["rss_peak_mb"], 1), "", ""],
    ]
    if result["rss_settled_mb"] is not None:
        rows.append([f"RSS {args.settle:g} s later (MB)", fmt(result["rss_settled_mb"], 1), "", ""])
    rows += [
        ["runs/s", fmt(result["runs_per_s"], 1), "", ""],
        ["server CPU per run (ms)", fmt(result["server_cpu_ms_per_run"], 2), "", ""],
        ["failed runs", str(sum(soak.errors.values())), "0", "yes" if not soak.errors else "NO"],
    ]
    print(table(["", "value", "goal", "met"], rows))
    for reason, count in sorted(soak.errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {count} x {reason}")
    if not goal_applies:
        print(f"  (the goal is for {GOAL_RUNS} runs without --heap)")
    print("RESULT " + json.dumps(result, default=str))
    return 1 if soak.errors else 0


if __name__ == "__main__":
    sys.exit(main())
