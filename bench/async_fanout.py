"""Background runs fanned out to many watchers: N runs x W watchers, tokens paced by the fake.

Per round (one per --n value) the bench starts fresh Backstream server(s) next to one
fake upstream (tests/support/fake_upstream, spec "tokens=T;delay_ms=1000/R;stamp=1"), then
the load-generator worker processes

  1. start N background runs  (POST /v1/messages/async, at most ~64 in flight), and
  2. at once open W watchers per run (GET /v1/messages/async/{id}/stream): each gets
     a replay from id 1, then follows live until stream_end closes the connection.

Every token the fake sends carries its own send time (time.monotonic_ns(), 20 digits),
so a watcher computes upstream-send -> watcher-receive latency without any clock sync.
Afterwards every run's final status is read to check that each watcher got exactly
ids 1..event_count, ending with stream_end.

    python bench/async_fanout.py                                  # sqlite, N=100,500,1000, W=2
    python bench/async_fanout.py --quick                          # smoke run: N=50, 40 tokens
    python bench/async_fanout.py --store redis --compare-replicas --n 500

The last line is `RESULT {json}`. Exit status 1 when a run did not complete, a watcher
lost events or failed; goals are reported, never enforced.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import gc
import json
import multiprocessing as mp
import os
import re
import resource
import secrets
import shutil
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402

from _common import (  # noqa: E402
    HOST,
    FakeUpstreamProcess,
    RssSampler,
    ServerProcess,
    fmt,
    machine_busy,
    make_work_dir,
    peak_rss_mb,
    percentile,
    proc_cpu_s,
    raise_fd_limit,
    source_version,
    table,
)
from tests.support.runs import TERMINAL  # noqa: E402

mono_ns = time.monotonic_ns
REDIS_URL = "redis://127.0.0.1:6379/14"  # the bench's own DB
# (runs, watchers per run, p99 ms, server RSS MB) from issue 13: 1000 x 2, and 10,000 watchers on 1000 runs.
GOALS = ((1000, 2, 50.0, 400.0), (1000, 10, 100.0, 1024.0))
HIST_NS = 10_000_000  # receive-time histogram bins: 10 ms

# One SSE frame header: "id: N\nevent: TYPE\n"; a token's stamp inside a text_delta's data.
FRAME_RE = re.compile(rb"id: (\d+)\nevent: ([a-z_]+)\n")
STAMP_RE = re.compile(rb'"delta":" (\d{20})"')


# ------------------------------------------------------------------ raw HTTP/1.1 client


class HttpError(Exception):
    pass


class Conn:
    """One keep-alive HTTP/1.1 connection for small JSON requests (start a run, read a status)."""

    __slots__ = ("port", "reader", "writer", "buf")

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        for attempt in (0, 1):  # a keep-alive connection the server has just closed gets one retry
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
                self.buf.clear()
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1")
            self.writer.write(head + body)
            try:
                status, head_lower = await _read_head(self.reader, self.buf)  # type: ignore[arg-type]
            except (HttpError, ConnectionError):
                self.close()
                if attempt == 0 and method == "GET":  # only an idempotent request is sent again
                    continue
                raise
            payload = await _read_body(self.reader, self.buf, head_lower)  # type: ignore[arg-type]
            if b"connection: close" in head_lower:
                self.close()
            return status, payload
        raise HttpError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None


async def _read_head(reader: asyncio.StreamReader, buf: bytearray) -> tuple[int, bytes]:
    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            break
        data = await reader.read(1 << 16)
        if not data:
            raise HttpError("connection closed before the response head")
        buf += data
    head = bytes(buf[:i])
    del buf[: i + 4]
    try:
        status = int(head[9:12])
    except ValueError:
        raise HttpError(f"bad status line {head[:40]!r}") from None
    return status, head.lower()


async def _read_body(reader: asyncio.StreamReader, buf: bytearray, head_lower: bytes) -> bytes:
    if b"transfer-encoding: chunked" in head_lower:
        out = bytearray()
        while True:
            j = buf.find(b"\r\n")
            if j >= 0:
                size = int(bytes(buf[:j]).split(b";", 1)[0], 16)
                if size == 0 and len(buf) >= j + 4:
                    del buf[: j + 4]
                    return bytes(out)
                if size and len(buf) >= j + 4 + size:
                    out += buf[j + 2 : j + 2 + size]
                    del buf[: j + 4 + size]
                    continue
            data = await reader.read(1 << 16)
            if not data:
                raise HttpError("connection closed inside a chunked body")
            buf += data
    n = 0
    for line in head_lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            n = int(line.split(b":", 1)[1])
    while len(buf) < n:
        data = await reader.read(1 << 16)
        if not data:
            raise HttpError("connection closed inside the body")
        buf += data
    out = bytes(buf[:n])
    del buf[:n]
    return out


# ------------------------------------------------------------------ load generator (worker processes)


class Hist:
    """Events received per 10 ms bin, relative to the round's t0."""

    __slots__ = ("t0", "bins")

    def __init__(self, t0: int) -> None:
        self.t0 = t0
        self.bins: dict[int, int] = {}

    def add(self, now: int, n: int) -> None:
        b = (now - self.t0) // HIST_NS
        bins = self.bins
        bins[b] = bins.get(b, 0) + n


async def watch(
    port: int,
    message_id: str,
    hist: Hist,
    stamps: array.array,
    lats: array.array,
    connect_gate: asyncio.Semaphore,
) -> tuple[Any, ...]:
    """Follow one run to its end. Returns
    (connect_ns, first_data_ns, end_ns, received, unique, gaps, dups, ended, error, live_tokens)."""
    connect_ns = first_ns = end_ns = 0
    received = unique = gaps = dups = live = 0
    nxt = 1  # next id expected
    last_type = b""
    error = ""
    writer = None
    try:
        async with connect_gate:  # bound the burst of TCP connects (the listen backlog), nothing after it
            reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        connect_ns = mono_ns()
        writer.write(
            f"GET /v1/messages/async/{message_id}/stream HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode("latin-1")
        )
        buf = bytearray()
        status, head = await _read_head(reader, buf)
        if status != 200 or b"transfer-encoding: chunked" not in head:
            body = await _read_body(reader, buf, head)
            raise HttpError(f"HTTP {status}: {body[:200]!r}")
        read = reader.read
        findall_frames = FRAME_RE.findall
        findall_stamps = STAMP_RE.findall
        pending = bytearray()  # SSE text not yet ending in a blank line
        done = False
        now = mono_ns()
        while True:
            # ---- chunked decoding: move whole chunks from buf to pending
            pos = 0
            while True:
                j = buf.find(b"\r\n", pos)
                if j < 0:
                    break
                size = int(buf[pos:j], 16)
                if size == 0:
                    done = True
                    break
                end = j + 2 + size
                if len(buf) < end + 2:
                    break
                pending += buf[j + 2 : end]
                pos = end + 2
            if pos:
                del buf[:pos]
            # ---- SSE: every complete frame in pending
            k = pending.rfind(b"\n\n")
            if k >= 0:
                text = bytes(pending[: k + 2])
                del pending[: k + 2]
                frames = findall_frames(text)
                if frames:
                    if not first_ns:
                        first_ns = now  # caught up: the replay so far came in this read
                    n = len(frames)
                    if first_ns != now:  # the first batch is the replay; the histogram counts live delivery
                        hist.add(now, n)
                    received += n
                    if int(frames[0][0]) == nxt and int(frames[-1][0]) == nxt + n - 1 and n <= 2:
                        nxt += n  # the common live case: one or two frames in order
                        unique += n
                    else:
                        for sid, _ in frames:
                            i = int(sid)
                            if i == nxt:
                                nxt += 1
                                unique += 1
                            elif i > nxt:
                                gaps += i - nxt
                                nxt = i + 1
                                unique += 1
                            else:
                                dups += 1
                    last_type = frames[-1][1]
                    if b'"delta":" ' in text:
                        for s in findall_stamps(text):
                            st = int(s)
                            if st > connect_ns:  # sent after we connected: a live token
                                stamps.append(st)
                                lats.append(now - st)
                                live += 1
            if done:
                end_ns = now
                break
            data = await read(1 << 16)
            now = mono_ns()
            if not data:
                raise HttpError("connection closed before the final chunk")
            buf += data
    except asyncio.CancelledError:
        error = "timed out (still streaming at the round deadline)"
    except (HttpError, ConnectionError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.transport.abort()
    ended = last_type == b"stream_end"
    return (connect_ns, first_ns, end_ns, received, unique, gaps, dups, ended, error, live)


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Start this worker's share of the runs; the moment a run's POST answers, its W watchers start.

    Starts are bounded (`post_concurrency` keep-alive connections); watchers are bounded only
    while connecting (`connect_concurrency`), never while streaming.
    """
    hist = Hist(job["t0_ns"])
    stamps = array.array("q")
    lats = array.array("q")
    body = job["body"]
    watchers = job["watchers"]
    gate = asyncio.Semaphore(job["connect_concurrency"])
    started: dict[int, tuple[str, int, str]] = {}  # run index -> (message_id, post sent ns, error)
    tasks: list[tuple[int, asyncio.Task[tuple[Any, ...]]]] = []
    queue = list(reversed(job["runs"]))

    async def poster() -> None:
        conns: dict[int, Conn] = {}
        try:
            while queue:
                idx, post_port, watch_port = queue.pop()
                conn = conns.setdefault(post_port, Conn(post_port))
                t = mono_ns()
                try:
                    status, payload = await conn.request("POST", "/v1/messages/async", body)
                    if status != 200:
                        started[idx] = ("", t, f"POST: HTTP {status}: {payload[:200]!r}")
                        continue
                    mid = orjson.loads(payload)["message_id"]
                except (HttpError, ConnectionError, OSError, ValueError, KeyError) as exc:
                    conn.close()
                    started[idx] = ("", t, f"POST: {type(exc).__name__}: {exc}")
                    continue
                started[idx] = (mid, t, "")
                for _ in range(watchers):
                    tasks.append((idx, asyncio.ensure_future(watch(watch_port, mid, hist, stamps, lats, gate))))
        finally:
            for c in conns.values():
                c.close()

    n_posters = max(1, min(job["post_concurrency"], len(queue)))
    posters = [asyncio.ensure_future(poster()) for _ in range(n_posters)]
    await asyncio.wait(posters, timeout=max(1.0, job["deadline_ns"] - mono_ns()) / 1e9)
    for p in posters:
        p.cancel()
    posted_ns = mono_ns()
    remaining = max(1.0, job["deadline_ns"] - mono_ns()) / 1e9
    if tasks:
        _, pending = await asyncio.wait([t for _, t in tasks], timeout=remaining)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    return {
        "started": started,
        "posted_ns": posted_ns,
        "watchers": [(idx, *t.result()) for idx, t in tasks],
        "hist": hist.bins,
        "stamps": stamps.tobytes(),
        "lats": lats.tobytes(),
    }


def worker_main(conn: Connection) -> None:
    """A load-generator process: runs one job per round, sent over the pipe (None ends it)."""
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    gc.freeze()
    while True:
        job = conn.recv()
        if job is None:
            return
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        result = run(run_job(job))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        result["wall_s"] = time.perf_counter() - t0
        conn.send(result)
        gc.collect()


class Workers:
    """The load-generator processes, forked before the bench starts any thread or event loop."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child,), name=f"loadgen-{i}", daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def run(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for pipe, job in zip(self.pipes, jobs, strict=False):
            pipe.send(job)
        return [pipe.recv() for pipe in self.pipes[: len(jobs)]]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


# ------------------------------------------------------------------ final statuses


async def fetch_statuses(
    ids: list[tuple[str, int]], concurrency: int = 32, wait_s: float = 20.0
) -> dict[str, dict[str, Any]]:
    """GET .../status for every run, re-asking (briefly) until it is terminal."""
    out: dict[str, dict[str, Any]] = {}
    queue = list(ids)
    deadline = time.monotonic() + wait_s

    async def getter() -> None:
        conns: dict[int, Conn] = {}
        try:
            while queue:
                mid, port = queue.pop()
                conn = conns.setdefault(port, Conn(port))
                while True:
                    try:
                        status, payload = await conn.request("GET", f"/v1/messages/async/{mid}/status")
                        doc = orjson.loads(payload) if status == 200 else {"status": f"HTTP {status}", "metadata": {}}
                    except (HttpError, ConnectionError, OSError, ValueError) as exc:
                        conn.close()
                        doc = {"status": f"status request failed: {exc}", "metadata": {}}
                    if (
                        doc.get("status") in TERMINAL
                        or time.monotonic() > deadline
                        or not doc.get("status", "").isalpha()
                    ):
                        break
                    await asyncio.sleep(0.1)
                out[mid] = doc
        finally:
            for c in conns.values():
                c.close()

    await asyncio.gather(*(getter() for _ in range(concurrency)))
    return out


def run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# ------------------------------------------------------------------ one round


_LOG_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (.*)$")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")
_IDS = re.compile(r"\b(?:msg|req|evt)_[0-9A-Z]+|\b\d+(?:\.\d+)?\b")


def log_summary(path: Path, top: int = 8) -> dict[str, int]:
    """The most frequent WARNING/ERROR lines and exception lines of a server log, ids and numbers masked."""
    counts: Counter = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m:
            counts[_IDS.sub("X", f"{m.group(1)} {m.group(2)}")[:160]] += 1
            continue
        m = _EXC_LINE.match(line.strip())
        if m:
            counts[_IDS.sub("X", f"raised {m.group(1)}: {m.group(2)}")[:160]] += 1
    return dict(counts.most_common(top))


def server_config(store: str, fake_port: int, spec: str, redis_prefix: str, server_workers: int = 1) -> str:
    lines = [f"store: {store}", "log_level: warning", "runs: {queue_limit: 100000}"]
    if server_workers > 1:
        lines.append(f"workers: {server_workers}")
    if store == "redis":
        lines.append(f'redis: {{url: "{REDIS_URL}", key_prefix: "{redis_prefix}", lease_s: 15}}')
    lines += [
        "models:",
        f'  - {{name: fake, provider: openai, base_url: "http://{HOST}:{fake_port}/v1", model: "{spec}", '
        "max_concurrency: 5000, retries: 0, timeout_s: 120}",
    ]
    return "\n".join(lines) + "\n"


def redis_cleanup(prefix: str) -> int:
    """Delete the round's keys from DB 14 (only keys under the bench's own random prefix)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        n = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += client.delete(*batch)
                batch.clear()
        if batch:
            n += client.delete(*batch)
        return n
    finally:
        client.close()


def redis_check() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(
            f"async_fanout: --store redis needs a Redis server at {REDIS_URL} ({exc}); "
            "`./dev.sh test` starts one, or: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no"
        ) from None
    finally:
        client.close()


def goal_verdict(rounds: list[dict[str, Any]], p99: float, rss: float) -> tuple[str, bool | None]:
    if not rounds:
        return "not measured in this run", None
    met = all(
        r["latency_p99_ms"] < p99 and r["lost_events"] == 0 and r["failed_runs"] == 0 and r["server_peak_rss_mb"] < rss
        for r in rounds
    )
    if met:
        return "met", True
    details = "; ".join(
        f"store {r['store']} x{r['replicas']}: p99 {r['latency_p99_ms']:.1f} ms, lost {r['lost_events']}, "
        f"failed runs {r['failed_runs']}, RSS {r['server_peak_rss_mb']:.0f} MB"
        for r in rounds
    )
    return f"NOT met ({details})", False


def run_round(
    args: argparse.Namespace,
    n: int,
    store: str,
    replicas: int,
    fake: FakeUpstreamProcess,
    workers: Workers,
    work: Path,
    label: str,
    spy_out: Path | None = None,
) -> dict[str, Any]:
    spec = f"tokens={args.tokens};delay_ms={1000 / args.rate:g};stamp=1"
    prefix = f"bsbench-{secrets.token_hex(6)}"
    config = server_config(store, fake.port, spec, prefix, args.server_workers)
    servers: list[ServerProcess] = []
    duration = args.tokens / args.rate
    print(f"  {label}: N={n} W={args.watchers} store={store} replicas={replicas} ...", flush=True)
    try:
        for k in range(replicas):
            servers.append(ServerProcess(work, config, name=f"{label}-replica{k}").start())
        ports = [s.port for s in servers]
        pids = {f"server{k}": s.pid for k, s in enumerate(servers)}
        body = orjson.dumps(
            {
                "model": "fake",
                "max_tokens": max(1000, args.tokens + 16),
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        # Run i is started on replica i % R and watched from the next one (the other, with 2).
        runs = [(i, ports[i % replicas], ports[(i + 1) % replicas]) for i in range(n)]
        nw = min(args.workers, n)
        t0 = mono_ns()
        deadline_ns = t0 + int((args.round_timeout or (60 + 4 * duration)) * 1e9)
        jobs = [
            {
                "t0_ns": t0,
                "runs": runs[w::nw],
                "watchers": args.watchers,
                "body": body,
                "post_concurrency": max(1, args.post_concurrency // nw),
                "connect_concurrency": max(1, args.connect_concurrency // nw),
                "deadline_ns": deadline_ns,
            }
            for w in range(nw)
        ]
        spy = None
        if spy_out is not None:
            from sync_stream import PySpy

            spy = PySpy(servers[0].pid, spy_out, args.py_spy_rate, args.py_spy_native)
            spy.start()
            time.sleep(0.5)  # let py-spy attach
        samplers = [RssSampler(s.pid, 0.1) for s in servers]
        for s in samplers:
            s.__enter__()
        cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
        fake_cpu0 = proc_cpu_s(fake.pid)
        busy0 = machine_busy()
        w0 = time.perf_counter()
        results = workers.run(jobs)
        wall = time.perf_counter() - w0
        busy1 = machine_busy()
        cpu1 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
        fake_cpu1 = proc_cpu_s(fake.pid)
        for s in samplers:
            s.__exit__()
        if spy is not None:
            spy.stop()
        peaks = [max(s.peak, peak_rss_mb(srv.pid) or 0.0) for s, srv in zip(samplers, servers, strict=False)]
        started: dict[int, tuple[str, int, str]] = {}
        for r in results:
            started.update(r["started"])
        ids = [(mid, runs[i][2]) for i, (mid, _, err) in started.items() if mid]
        statuses = run_async(fetch_statuses(ids))
        logs = [log_summary(s.log_path) for s in servers]
    finally:
        for s in servers:
            s.stop()
        if store == "redis":
            try:
                removed = redis_cleanup(prefix)
            except Exception as exc:  # noqa: BLE001
                print(f"    (redis cleanup of {prefix}:* failed: {exc})", file=sys.stderr)
            else:
                print(f"    (deleted {removed} redis keys under {prefix}:*)", flush=True)

    return summarise_round(
        args,
        n,
        store,
        replicas,
        results,
        started,
        statuses,
        wall,
        cpu1,
        cpu0,
        fake_cpu1 - fake_cpu0,
        busy0,
        busy1,
        peaks,
        duration,
        logs,
        t0,
    )


def summarise_round(
    args: argparse.Namespace,
    n: int,
    store: str,
    replicas: int,
    results: list[dict[str, Any]],
    started: dict[int, tuple[str, int, str]],
    statuses: dict[str, dict[str, Any]],
    wall: float,
    cpu1: dict[str, float],
    cpu0: dict[str, float],
    fake_cpu: float,
    busy0: tuple[float, float],
    busy1: tuple[float, float],
    peaks: list[float],
    duration: float,
    logs: list[str],
    t0: int,
) -> dict[str, Any]:
    errors: Counter = Counter()
    for _mid, _t, err in started.values():
        if err:
            errors[err[:200]] += 1
    # ---- runs
    run_status: Counter = Counter()
    event_counts: dict[int, int] = {}
    completed_counts: list[int] = []
    for i, (mid, _, _err) in started.items():
        if not mid:
            run_status["not started"] += 1
            continue
        doc = statuses.get(mid, {})
        run_status[doc.get("status", "unknown")] += 1
        event_counts[i] = int((doc.get("metadata") or {}).get("event_count") or 0)
        if doc.get("status") == "completed":
            completed_counts.append(event_counts[i])
    if len(started) < n:
        run_status["never started (round deadline)"] = n - len(started)
    failed_runs = n - run_status.get("completed", 0)
    completed_counts.sort()
    per_run_events = completed_counts[len(completed_counts) // 2] if completed_counts else args.tokens + 6

    # ---- watchers
    lost = seq_errors = bad_end = watcher_errors = 0
    attach_ms: list[float] = []  # GET sent -> first events (the replay) read
    firsts: list[int] = []
    ends: list[int] = []
    total_events = 0
    for r in results:
        for idx, connect_ns, first_ns, end_ns, received, unique, gaps, dups, ended, error, _live in r["watchers"]:
            expected = event_counts.get(idx, 0)
            total_events += received
            lost += max(0, expected - unique)  # a gap or a missing tail leaves unique short of expected
            seq_errors += gaps + dups
            if error:
                watcher_errors += 1
                errors[f"watcher: {error[:200]}"] += 1
            elif not ended:
                bad_end += 1
                errors["watcher: stream did not end with stream_end"] += 1
            if received != expected and not error:
                errors[f"watcher: received {received} events, status says {expected}"] += 1
            if first_ns:
                firsts.append(first_ns)
                if connect_ns:
                    attach_ms.append((first_ns - connect_ns) / 1e6)
            if end_ns:
                ends.append(end_ns)
    n_watchers = sum(len(r["watchers"]) for r in results)

    # All N runs are live from the moment the last POST was answered until the first stream_end
    # reaches a watcher: the all-live window. Catch-up stats are reported beside it.
    firsts.sort()
    caught_up_99 = firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))] if firsts else 0
    all_started = max(r["posted_ns"] for r in results) if results else 0

    # ---- latency: live tokens only (sent after the watcher connected); steady: sent inside the window
    lat_ms: list[float] = []
    steady_ms: list[float] = []
    first_end = min(ends) if ends else 0
    for r in results:
        st = array.array("q")
        st.frombytes(r["stamps"])
        la = array.array("q")
        la.frombytes(r["lats"])
        lat_ms.extend(x / 1e6 for x in la)
        steady_ms.extend(x / 1e6 for x, s in zip(la, st, strict=False) if all_started < s < first_end)
    lat_ms.sort()
    steady_ms.sort()

    # ---- delivered events/s over the all-live window (live deliveries only: no watcher's first read)
    bins: Counter = Counter()
    for r in results:
        bins.update(r["hist"])
    window = None
    if ends and all_started:
        lo = (all_started - t0) // HIST_NS + 1
        hi = (first_end - t0) // HIST_NS  # exclusive
        if hi - lo >= 50:  # at least 0.5 s
            window = (lo, hi)
    peak_1s = 0  # the most live events received in any 1 s (sliding over the 10 ms bins)
    if bins:
        first_b, last_b = min(bins), max(bins)
        run_sum = sum(bins.get(b, 0) for b in range(first_b, first_b + 100))
        peak_1s = run_sum
        for b in range(first_b + 100, last_b + 1):
            run_sum += bins.get(b, 0) - bins.get(b - 100, 0)
            peak_1s = max(peak_1s, run_sum)
    if window is not None:
        window_s = (window[1] - window[0]) * HIST_NS / 1e9
        delivered = sum(bins.get(b, 0) for b in range(*window)) / window_s
        window_kind = "all-live"
    else:
        # Never were all runs live at once (starting them took longer than a run lasts, give or
        # take the lag): the best 1 s of live delivery instead, which includes catch-up bursts.
        window_s = float("nan")
        delivered = float(peak_1s)
        window_kind = "peak-1s"
    # The most runs live at once, a run being live from its POST until its first watcher saw stream_end.
    run_end: dict[int, int] = {}
    for r in results:
        for w in r["watchers"]:
            if w[3]:
                run_end[w[0]] = min(run_end.get(w[0], w[3]), w[3])
    edges = sorted([(started[i][1], 1) for i in run_end] + [(e, -1) for e in run_end.values()])
    live_runs = max_live_runs = 0
    for _, d in edges:
        live_runs += d
        max_live_runs = max(max_live_runs, live_runs)
    expected_rate = n * args.watchers * per_run_events / duration
    steady_expected = n * args.watchers * args.rate

    server_cpu = sum(cpu1[k] - cpu0[k] for k in cpu1)
    lg_cpu = [r["cpu_s"] for r in results]
    busy = (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])
    posted = [r["posted_ns"] for r in results]
    post_s = (max(posted) - t0) / 1e9 if posted else float("nan")
    out = {
        "n": n,
        "watchers_per_run": args.watchers,
        "watchers": n_watchers,
        "store": store,
        "replicas": replicas,
        "tokens": args.tokens,
        "rate": args.rate,
        "events_per_run": per_run_events,
        "delivered_events_per_s": delivered,
        "delivered_kind": window_kind,
        "window_s": window_s,
        "expected_events_per_s": expected_rate,
        "steady_expected_events_per_s": steady_expected,
        "peak_1s_live_events_per_s": peak_1s,
        "events_received": total_events,
        "max_live_runs": max_live_runs,
        "runs_started_per_s": n / post_s if post_s == post_s and post_s > 0 else float("nan"),
        "latency_p50_ms": percentile(lat_ms, 50),
        "latency_p99_ms": percentile(lat_ms, 99),
        "latency_max_ms": lat_ms[-1] if lat_ms else float("nan"),
        "live_tokens": len(lat_ms),
        "steady_latency_p50_ms": percentile(steady_ms, 50),
        "steady_latency_p99_ms": percentile(steady_ms, 99),
        "steady_tokens": len(steady_ms),
        "lost_events": lost,
        "sequence_errors": seq_errors,
        "watchers_without_end": bad_end,
        "watcher_errors": watcher_errors,
        "failed_runs": failed_runs,
        "run_statuses": dict(run_status),
        "server_peak_rss_mb": sum(peaks),
        "server_peak_rss_per_replica_mb": peaks,
        "server_cpu_pct": 100 * server_cpu / wall,
        "loadgen_cpu_pct": 100 * sum(lg_cpu) / wall,
        "loadgen_cpu_pct_per_process": [100 * c / wall for c in lg_cpu],
        "fake_cpu_pct": 100 * fake_cpu / wall,
        "machine_busy_pct": 100 * busy,
        # What the whole machine was busy with beyond the server(s), the fake and the load generator
        # (100 = one core): anything large means something else ran alongside and the numbers are suspect.
        "other_cpu_pct": 100 * busy * (os.cpu_count() or 1) - 100 * (server_cpu + fake_cpu + sum(lg_cpu)) / wall,
        "start_all_runs_s": post_s,
        "attach_p50_ms": percentile(sorted(attach_ms), 50),
        "attach_p99_ms": percentile(sorted(attach_ms), 99),
        "attach_max_ms": max(attach_ms) if attach_ms else float("nan"),
        "first_run_ended_s": (first_end - t0) / 1e9 if first_end else float("nan"),
        "watchers_caught_up_s": (caught_up_99 - t0) / 1e9 if firsts else float("nan"),
        "last_watcher_caught_up_s": (firsts[-1] - t0) / 1e9 if firsts else float("nan"),
        "round_wall_s": wall,
        "errors": dict(errors.most_common(10)),
    }
    if errors or failed_runs:
        out["server_log"] = {f"replica{k}": summary for k, summary in enumerate(logs) if summary}
    return out


# ------------------------------------------------------------------ output


HEADERS = [
    "store",
    "repl",
    "runs",
    "watchers",
    "starts/s",
    "max live runs",
    "delivered ev/s",
    "expected ev/s",
    "window s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "steady p99 ms",
    "lost",
    "failed runs",
    "server RSS MB",
    "server CPU %",
    "loadgen CPU %",
    "fake CPU %",
    "machine busy %",
]


def row(r: dict[str, Any]) -> list[Any]:
    delivered = fmt(r["delivered_events_per_s"], 0) + ("*" if r["delivered_kind"] != "all-live" else "")
    return [
        r["store"],
        r["replicas"],
        r["n"],
        r["watchers"],
        fmt(r["runs_started_per_s"], 0),
        r["max_live_runs"],
        delivered,
        fmt(r["expected_events_per_s"], 0),
        fmt(r["window_s"], 2),
        fmt(r["latency_p50_ms"], 1),
        fmt(r["latency_p99_ms"], 1),
        fmt(r["latency_max_ms"], 1),
        fmt(r["steady_latency_p99_ms"], 1),
        r["lost_events"],
        r["failed_runs"],
        fmt(r["server_peak_rss_mb"], 1),
        fmt(r["server_cpu_pct"], 0),
        fmt(r["loadgen_cpu_pct"], 0),
        fmt(r["fake_cpu_pct"], 0),
        fmt(r["machine_busy_pct"], 0),
    ]


def print_round(r: dict[str, Any]) -> None:
    print(
        f"    runs started in {r['start_all_runs_s']:.2f} s, first stream_end read at {r['first_run_ended_s']:.2f} s, "
        f"99% of watchers caught up at {r['watchers_caught_up_s']:.2f} s (all at {r['last_watcher_caught_up_s']:.2f} s), "
        f"round {r['round_wall_s']:.1f} s; watch attach (GET sent -> first events) p50 {r['attach_p50_ms']:.1f} ms, "
        f"p99 {r['attach_p99_ms']:.1f} ms, max {r['attach_max_ms']:.1f} ms;\n"
        f"    {r['events_received']} events received, {r['live_tokens']} live tokens timed; "
        f"statuses {r['run_statuses']}; loadgen CPU per process "
        + " ".join(f"{x:.0f}%" for x in r["loadgen_cpu_pct_per_process"]),
        flush=True,
    )
    if r["other_cpu_pct"] > 20:
        print(
            f"    ! the machine was busy with other processes too (about {r['other_cpu_pct']:.0f}% of a core "
            "beyond the server, fake and load generator): these numbers are perturbed",
            flush=True,
        )
    for text, count in r["errors"].items():
        print(f"    ! {count:6d}  {text}", flush=True)
    for replica, summary in r.get("server_log", {}).items():
        print(
            f"    server log, {replica} (most frequent warnings, errors and exceptions; ids replaced by X):", flush=True
        )
        for text, count in summary.items():
            print(f"      {count:6d}  {text}", flush=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, 3)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="100,500,1000", help="concurrent runs per round, comma list (default 100,500,1000)")
    ap.add_argument("--watchers", type=int, default=2, help="watchers per run (default 2)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per run (default 100)")
    ap.add_argument("--rate", type=float, default=20.0, help="tokens per second per run (default 20)")
    ap.add_argument(
        "--store", choices=["sqlite", "memory", "redis"], default="sqlite", help="server store (default sqlite)"
    )
    ap.add_argument("--replicas", type=int, choices=[1, 2], default=1, help="server processes; 2 needs --store redis")
    ap.add_argument(
        "--compare-replicas",
        action="store_true",
        help="redis store, each N with 1 and then 2 replicas; prints the throughput ratio and p99s",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: N=50, 40 tokens")
    ap.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")
    ap.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="`backstream serve --workers K` per replica (K > 1 needs --store redis); CPU and RSS sum the workers",
    )
    ap.add_argument(
        "--post-concurrency", type=int, default=64, help="run starts in flight, over all workers (default 64)"
    )
    ap.add_argument(
        "--connect-concurrency",
        type=int,
        default=256,
        help="watcher TCP connects in flight at once, over all workers (default 256)",
    )
    ap.add_argument(
        "--round-timeout", type=float, default=0.0, help="seconds a round may take (default 60 + 4 x run duration)"
    )
    ap.add_argument(
        "--py-spy",
        metavar="FILE",
        help="profile the first server during the largest round "
        "(collapsed stacks to FILE, summary printed; slows the server)",
    )
    ap.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--py-spy-native", action="store_true", help="with --py-spy: native (C) frames too")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, server logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.tokens = "50", 40
    args.ns = [int(x) for x in str(args.n).split(",") if x.strip()]
    if args.compare_replicas:
        args.store = "redis"
    if args.server_workers > 1 and args.store != "redis":
        ap.error("--server-workers > 1 needs --store redis")
    if args.replicas == 2 and args.store != "redis":
        ap.error("--replicas 2 needs --store redis (replicas share work only through Redis)")
    if args.watchers < 1 or any(n < 1 for n in args.ns) or args.tokens < 1 or args.rate <= 0:
        ap.error("--n, --watchers, --tokens and --rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workers = Workers(max(1, args.workers))  # fork first: no threads or loops exist yet
    raise_fd_limit()
    if args.store == "redis":
        redis_check()
    version = source_version()
    work = make_work_dir("backstream-fanout-")
    fake = FakeUpstreamProcess(work)
    plan: list[tuple[int, int]] = []  # (n, replicas)
    for n in args.ns:
        plan += [(n, 1), (n, 2)] if args.compare_replicas else [(n, args.replicas)]
    largest = max(args.ns)
    results: list[dict[str, Any]] = []
    profile = None
    print(
        f"async_fanout: N={','.join(map(str, args.ns))}, W={args.watchers}, {args.tokens} tokens at {args.rate:g}/s "
        f"({args.tokens / args.rate:g} s per run), store {args.store}"
        + (", replicas 1 vs 2" if args.compare_replicas else f", replicas {args.replicas}")
        + f", {args.server_workers} server worker(s) each, {args.workers} loadgen processes, {os.cpu_count()} CPUs,"
        f" source {version}",
        flush=True,
    )
    try:
        fake.start()
        for k, (n, replicas) in enumerate(plan):
            spy_out = None
            if args.py_spy and n == largest and profile is None:
                profile = spy_out = Path(args.py_spy).resolve()
            r = run_round(args, n, args.store, replicas, fake, workers, work, f"round{k + 1}", spy_out)
            results.append(r)
            print_round(r)
    finally:
        fake.stop()
        workers.stop()

    print()
    print(table(HEADERS, [row(r) for r in results], align="ll" + "r" * (len(HEADERS) - 2)))
    print(
        "  starts/s = N / time to get every POST answered; max live runs = most runs between POST and stream_end at once.\n"
        "  delivered = events of every type that reached the watchers live (a watcher's first read, its replay, is not "
        "counted) per second,\n    in the all-live window: from the last POST answered to the first stream_end read "
        "(* = no such window of 0.5 s: the best 1 s of live delivery instead);\n"
        "  expected = N x W x events-per-run / run duration; inside the window only text_delta flow, so a server "
        "that keeps up shows N x W x rate there (tokens/(tokens+6) of expected).\n"
        "  latency = fake sent the token -> watcher read it, for tokens sent after the watcher connected; "
        "steady p99 = only tokens sent inside the all-live window. CPU % = 100 per core."
    )

    compare = None
    if args.compare_replicas:
        print()
        compare = []
        for n in args.ns:
            one = next(r for r in results if r["n"] == n and r["replicas"] == 1)
            two = next(r for r in results if r["n"] == n and r["replicas"] == 2)
            ratio = (
                two["delivered_events_per_s"] / one["delivered_events_per_s"]
                if one["delivered_events_per_s"]
                else float("nan")
            )
            peak_ratio = (
                two["peak_1s_live_events_per_s"] / one["peak_1s_live_events_per_s"]
                if one["peak_1s_live_events_per_s"]
                else float("nan")
            )
            compare.append(
                {
                    "n": n,
                    "throughput_ratio_2_over_1": ratio,
                    "peak_1s_ratio_2_over_1": peak_ratio,
                    "p99_ms_1": one["latency_p99_ms"],
                    "p99_ms_2": two["latency_p99_ms"],
                    "lost_1": one["lost_events"],
                    "lost_2": two["lost_events"],
                    "failed_runs_1": one["failed_runs"],
                    "failed_runs_2": two["failed_runs"],
                }
            )
            print(
                f"compare N={n}: throughput ratio 2/1 replicas = {ratio:.3f} (delivered ev/s), {peak_ratio:.3f} (peak 1 s); "
                f"p99 latency 1 replica {one['latency_p99_ms']:.1f} ms, 2 replicas {two['latency_p99_ms']:.1f} ms; "
                f"lost {one['lost_events']} / {two['lost_events']}, failed runs {one['failed_runs']} / {two['failed_runs']}"
            )

    met = None
    for n, w, p99, rss in GOALS:
        verdict, ok = goal_verdict([r for r in results if r["n"] == n and r["watchers_per_run"] == w], p99, rss)
        print(f"\ngoal: {n} runs × {w} watchers, p99 < {p99:g} ms, 0 lost, server RSS < {rss:g} MB — {verdict}")
        if ok is not None:
            met = ok if met is None else met and ok

    if profile is not None and profile.exists():
        from sync_stream import summarise_profile

        print()
        print(summarise_profile(profile))

    result = {
        "source": version,
        "cpus": os.cpu_count(),
        "store": args.store,
        "server_workers": args.server_workers,
        "watchers": args.watchers,
        "tokens": args.tokens,
        "rate": args.rate,
        "loadgen_processes": args.workers,
        "rounds": results,
        "compare_replicas": compare,
        "goal_met": met,
    }
    print("RESULT " + json.dumps(_json_safe(result), separators=(",", ":")))
    if args.keep:
        print(f"(work dir kept: {work})", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    bad = any(r["lost_events"] or r["failed_runs"] or r["watcher_errors"] or r["watchers_without_end"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
