"""Synchronous streaming through Backstream versus straight to the upstream.

C concurrent clients loop streamed requests for a fixed time, in alternating rounds:

    A  through Backstream:  POST /v1/messages          (stream: true, model "fake")
    B  direct to the fake:  POST /v1/chat/completions  (the same spec the gateway asks for)

The fake upstream (tests/support/fake_upstream) and the server run as separate processes
started here, so the load generator's CPU is never counted as theirs. The load
generator is deliberately lean: asyncio on uvloop, one raw keep-alive HTTP/1.1
connection per client, a hand-written request and a hand-written chunked/SSE parser.

    python bench/sync_stream.py            # C=64, 3 x (8 s A + 8 s B), about a minute
    python bench/sync_stream.py --quick    # smoke run: C=8, 2 s, 1 round each
    python bench/sync_stream.py --dialect all   # also rounds in each wire dialect (Anthropic,
                                                # OpenAI chat, OpenAI responses) against native A

The last line is `RESULT {json}` with every number printed above it. The exit status
is 1 when any request failed or any stream came back short (the numbers are then
not trustworthy), 0 otherwise; goals are reported, never enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
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
    median,
    peak_rss_mb,
    percentile,
    proc_cpu_s,
    rss_mb,
    source_version,
    table,
)

perf = time.perf_counter
_loads = orjson.loads

BACKSTREAM = "backstream"
DIRECT = "direct"
# Wire dialects: the same run through Backstream, answered in a foreign format.
DIALECTS = ("anthropic", "chat", "responses")
# How each side's response is read: which SSE events carry a token and which one ends the stream.
BACKGROUND = "background"  # POST /v1/messages/async, then watch the run on the same connection
MODE = {
    BACKSTREAM: "native",
    DIRECT: "openai",
    "anthropic": "anthropic",
    "chat": "openai",
    "responses": "responses",
    BACKGROUND: "background",
}

GOALS = {
    "dialect_cpu_overhead_ms": ("<=", 0.5),  # a dialect's server CPU per request minus native's
    "background_throughput_ratio": (">=", 0.95),
    "background_ttft_p99_overhead_ms": ("<", 15.0),
    "throughput_ratio": (">=", 0.9),
    "ttft_p99_overhead_ms": ("<", 10.0),
    "cpu_ms_per_request": ("<=", 4.0),
    "idle_rss_mb": ("<", 120.0),
    "startup_s": ("<", 1.5),
}


def goal_met(name: str, value: float | None) -> str:
    if value is None or value != value:
        return "?"
    op, target = GOALS[name]
    ok = {">=": value >= target, "<": value < target, "<=": value <= target}[op]
    return "yes" if ok else "NO"


def goal_text(name: str) -> str:
    op, target = GOALS[name]
    return f"{op} {target:g}"


# ------------------------------------------------------------------ requests


def build_request(path: str, port: int, body: dict[str, Any], extra_headers: str = "") -> bytes:
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"{extra_headers}"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + payload


class ProtocolError(Exception):
    pass


class Conn:
    __slots__ = ("reader", "writer", "buf", "port")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.port = port

    @classmethod
    async def open(cls, port: int) -> Conn:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
        return cls(reader, writer, port)

    def close(self) -> None:
        try:
            self.writer.transport.abort()
        except Exception:
            pass


# A finished request: (t_sent, ttft_s or None, t_done, tokens, ok, error text or "").
Sample = tuple[float, "float | None", float, int, bool, str]


async def _read_more(conn: Conn) -> tuple[bytes, float]:
    data = await conn.reader.read(1 << 16)
    if not data:
        raise ProtocolError("connection closed by the server")
    return data, perf()


async def _drain_error_body(conn: Conn, head: bytes) -> bool:
    """Consume a non-SSE response body; True if the connection can be reused."""
    buf = conn.buf
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        pos = 0
        while True:
            j = buf.find(b"\r\n", pos)
            if j >= 0:
                size = int(bytes(buf[pos:j]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(buf) >= j + 4:
                        del buf[: j + 4]
                        break
                elif len(buf) >= j + 2 + size + 2:
                    pos = j + 2 + size + 2
                    continue
            del buf[:pos]
            pos = 0
            data, _ = await _read_more(conn)
            buf += data
    else:
        n = 0
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                n = int(line.split(b":", 1)[1])
        while len(buf) < n:
            data, _ = await _read_more(conn)
            buf += data
        del buf[:n]
    return b"connection: close" not in lower


def _sse_field(ev: bytes, name: bytes) -> bytes | None:
    k = ev.find(name)
    if k < 0:
        return None
    nl = ev.find(b"\n", k)
    return ev[k + len(name) : nl if nl >= 0 else len(ev)]


def scan_dialect(mode: str, ev: bytes) -> tuple[int, bool, str]:
    """One SSE event of a dialect stream: (tokens in it, whether it ends the stream well, a problem)."""
    etype = _sse_field(ev, b"event: ")
    if etype is None:
        return 0, False, ""  # ": keepalive" comment
    if mode == "anthropic":
        if etype == b"content_block_delta":
            d = _loads(_sse_field(ev, b"data: ") or b"{}")
            return (1 if d["delta"].get("text") else 0), False, ""
        if etype == b"message_delta":
            d = _loads(_sse_field(ev, b"data: ") or b"{}")
            reason = d["delta"]["stop_reason"]
            return 0, reason == "end_turn", "" if reason == "end_turn" else f"stop_reason {reason}"
        return 0, False, "error event" if etype == b"error" else ""
    if etype == b"response.output_text.delta":
        return (1 if _loads(_sse_field(ev, b"data: ") or b"{}").get("delta") else 0), False, ""
    if etype in (b"response.completed", b"response.failed", b"response.incomplete"):
        return 0, etype == b"response.completed", "" if etype == b"response.completed" else etype.decode()
    return 0, False, ""


async def do_request(conn: Conn, request: bytes, mode: str, expected: int) -> tuple[Sample, bool]:
    """Send one streamed request and read its response to the end. Returns (sample, reusable)."""
    buf = conn.buf
    reader_read = conn.reader.read
    conn.writer.write(request)
    t_sent = perf()

    # ---- status line and headers
    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            break
        data = await reader_read(1 << 16)
        if not data:
            raise ProtocolError("connection closed before the response head")
        buf += data
    head = bytes(buf[:i])
    del buf[: i + 4]
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError(f"bad status line {head[:40]!r}") from None
    if status != 200 or b"transfer-encoding: chunked" not in head.lower():
        reusable = await _drain_error_body(conn, head)
        return (t_sent, None, perf(), 0, False, f"HTTP {status}"), reusable

    # ---- chunked body carrying SSE events
    tokens = 0
    t_first: float | None = None
    ended = False  # saw stream_end with finish_reason Stop / data: [DONE]
    problem = ""
    pending = b""  # an SSE event split across chunks
    pos = 0
    now = t_sent
    done = False
    while True:
        while True:
            j = buf.find(b"\r\n", pos)
            if j < 0:
                break
            size = int(buf[pos:j], 16) if b";" not in buf[pos:j] else int(bytes(buf[pos:j]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < j + 4:  # "0\r\n" + "\r\n" (no trailers expected)
                    break
                pos = j + 4
                done = True
                break
            end = j + 2 + size
            if len(buf) < end + 2:
                break
            text = pending + buf[j + 2 : end] if pending else bytes(buf[j + 2 : end])
            pos = end + 2
            events = text.split(b"\n\n")
            pending = events.pop()
            for ev in events:
                if mode in ("anthropic", "responses"):
                    n, well, bad = scan_dialect(mode, ev)
                    if n and t_first is None:
                        t_first = now
                    tokens += n
                    ended = ended or well
                    problem = problem or bad
                elif mode == "native":
                    # "id: N\nevent: TYPE\ndata: {...}"
                    k = ev.find(b"event: ")
                    if k < 0:
                        continue  # ": keepalive" comment
                    nl = ev.find(b"\n", k)
                    etype = ev[k + 7 : nl]
                    if etype == b"text_delta":
                        d = _loads(ev[ev.find(b"data: ", nl) + 6 :])
                        if d.get("delta"):
                            tokens += 1
                            if t_first is None:
                                t_first = now
                    elif etype == b"stream_end":
                        d = _loads(ev[ev.find(b"data: ", nl) + 6 :])
                        if d.get("finish_reason") == "Stop":
                            ended = True
                        else:
                            problem = f"stream_end {d.get('finish_reason')}: {d.get('error')}"
                else:
                    if not ev.startswith(b"data: "):
                        continue
                    data = ev[6:]
                    if data == b"[DONE]":
                        ended = True
                        continue
                    d = _loads(data)
                    if d.get("error"):
                        problem = f"upstream error: {d['error']}"
                        continue
                    for choice in d.get("choices") or ():
                        if (choice.get("delta") or {}).get("content"):
                            tokens += 1
                            if t_first is None:
                                t_first = now
        if done:
            break
        if pos:
            del buf[:pos]
            pos = 0
        data = await reader_read(1 << 16)
        now = perf()
        if not data:
            raise ProtocolError("connection closed mid-stream")
        buf += data
    del buf[:pos]
    t_done = perf()
    ok = ended and tokens == expected and not problem
    if not ok and not problem:
        problem = f"short stream: {tokens}/{expected} tokens, end seen: {ended}"
    ttft = (t_first - t_sent) if t_first is not None else None
    return (t_sent, ttft, t_done, tokens, ok, problem), True


async def do_background(conn: Conn, post: bytes, expected: int) -> tuple[Sample, bool]:
    """POST a background run, then watch it on the same keep-alive connection; timed from the POST."""
    buf = conn.buf
    conn.writer.write(post)
    t_sent = perf()
    while (i := buf.find(b"\r\n\r\n")) < 0:
        data = await conn.reader.read(1 << 16)
        if not data:
            raise ProtocolError("connection closed before the response head")
        buf += data
    head = bytes(buf[:i]).lower()
    length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(buf) < i + 4 + length:
        data = await conn.reader.read(1 << 16)
        if not data:
            raise ProtocolError("connection closed in the response body")
        buf += data
    body = bytes(buf[i + 4 : i + 4 + length])
    del buf[: i + 4 + length]
    if head[9:12] != b"200":
        return (t_sent, None, perf(), 0, False, f"HTTP {head[9:12].decode()} {body[:120]!r}"), True
    mid = _loads(body)["message_id"]
    get = (
        f"GET /v1/messages/async/{mid}/stream HTTP/1.1\r\nHost: {HOST}:{conn.port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    (t_get, ttft, t_done, tokens, ok, problem), reusable = await do_request(conn, get, "native", expected)
    return (t_sent, None if ttft is None else ttft + (t_get - t_sent), t_done, tokens, ok, problem), reusable


# ------------------------------------------------------------------ rounds


@dataclass
class RoundResult:
    side: str
    index: int
    seconds: float  # measurement window
    samples: list[Sample]  # every request finished in the round (window or not)
    window: tuple[float, float]
    errors: Counter = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # pid label -> CPU seconds over the round
    wall_s: float = 0.0  # whole round: connect, stagger, window, drain
    loadgen_cpu_s: float = 0.0
    machine_busy_frac: float = 0.0

    @property
    def in_window(self) -> list[Sample]:
        lo, hi = self.window
        return [s for s in self.samples if lo <= s[2] <= hi and s[4]]

    @property
    def completed(self) -> int:
        return sum(1 for s in self.samples if s[4])

    @property
    def failed(self) -> int:
        return sum(1 for s in self.samples if not s[4]) + sum(self.errors.values())


async def run_round(
    side: str,
    index: int,
    port: int,
    request: bytes,
    concurrency: int,
    seconds: float,
    stagger_s: float,
    expected: int,
    watch: dict[str, int],
    drain_timeout: float = 30.0,
) -> RoundResult:
    """C clients on C keep-alive connections; starts staggered over `stagger_s`, then a `seconds` window."""
    mode = MODE[side]
    gc.collect()
    cpu0 = {name: proc_cpu_s(pid) for name, pid in watch.items()}
    busy0 = machine_busy()
    lg0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = perf()

    conns: list[Conn] = list(await asyncio.gather(*(Conn.open(port) for _ in range(concurrency))))
    t_start = perf()
    lo = t_start + stagger_s
    hi = lo + seconds
    samples: list[Sample] = []
    errors: Counter = Counter()

    async def client(i: int) -> None:
        conn = conns[i]
        await asyncio.sleep(stagger_s * i / concurrency)
        try:
            while perf() < hi:
                try:
                    if mode == BACKGROUND:
                        sample, reusable = await do_background(conn, request, expected)
                    else:
                        sample, reusable = await do_request(conn, request, mode, expected)
                except (ProtocolError, ConnectionError, OSError, ValueError) as exc:
                    errors[f"{type(exc).__name__}: {exc}"] += 1
                    reusable = False
                else:
                    samples.append(sample)
                if not reusable:
                    conn.close()
                    conn = conns[i] = await Conn.open(port)
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(client(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=stagger_s + seconds + drain_timeout)
    for t in pending:
        t.cancel()
        errors["request still running long after the round ended"] += 1
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            errors[f"client crashed: {t.exception()!r}"] += 1

    wall = perf() - wall0
    lg1 = resource.getrusage(resource.RUSAGE_SELF)
    busy1 = machine_busy()
    cpu1 = {name: proc_cpu_s(pid) for name, pid in watch.items()}
    total = busy1[1] - busy0[1]
    return RoundResult(
        side=side,
        index=index,
        seconds=seconds,
        samples=samples,
        window=(lo, hi),
        errors=errors,
        cpu_s={name: cpu1[name] - cpu0[name] for name in watch},
        wall_s=wall,
        loadgen_cpu_s=(lg1.ru_utime - lg0.ru_utime) + (lg1.ru_stime - lg0.ru_stime),
        machine_busy_frac=(busy1[0] - busy0[0]) / total if total > 0 else float("nan"),
    )


def side_stats(rounds: list[RoundResult]) -> dict[str, Any]:
    window_samples = [s for r in rounds for s in r.in_window]
    window_s = sum(r.seconds for r in rounds)
    ttfts = sorted(s[1] * 1000 for s in window_samples if s[1] is not None)
    lat = sorted((s[2] - s[0]) * 1000 for s in window_samples)
    completed = sum(r.completed for r in rounds)
    return {
        "rounds": len(rounds),
        "requests_in_window": len(window_samples),
        "requests_completed": completed,
        "requests_per_s": len(window_samples) / window_s if window_s else float("nan"),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "ttft_max_ms": ttfts[-1] if ttfts else float("nan"),
        "latency_p50_ms": percentile(lat, 50),
        "latency_p99_ms": percentile(lat, 99),
        "tokens_per_s": sum(s[3] for s in window_samples) / window_s if window_s else float("nan"),
        "errors": sum(r.failed for r in rounds),
        "short_streams": sum(1 for r in rounds for s in r.samples if not s[4] and s[5].startswith("short")),
        "loadgen_cpu_pct": 100 * sum(r.loadgen_cpu_s for r in rounds) / max(1e-9, sum(r.wall_s for r in rounds)),
        "machine_busy_pct": 100
        * sum(r.machine_busy_frac * r.wall_s for r in rounds)
        / max(1e-9, sum(r.wall_s for r in rounds)),
        "per_round_rps": [len(r.in_window) / r.seconds for r in rounds],
    }


def cpu_ms_per_request(rounds: list[RoundResult], who: str) -> float:
    n = sum(r.completed for r in rounds)
    return 1000 * sum(r.cpu_s.get(who, 0.0) for r in rounds) / n if n else float("nan")


def error_summary(rounds: list[RoundResult]) -> Counter:
    c: Counter = Counter()
    for r in rounds:
        c.update(r.errors)
        c.update(s[5] for s in r.samples if not s[4])
    return c


# ------------------------------------------------------------------ py-spy


class PySpy:
    """`py-spy record --format raw` on the server for the Backstream rounds (idle time is not sampled)."""

    def __init__(self, pid: int, out: Path, rate: int, native: bool = False) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.native = native
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).parent / "py-spy"
        cmd = [
            str(exe) if exe.exists() else "py-spy",
            "record",
            "--format",
            "raw",
            "--function",
            "--rate",
            str(self.rate),
            "--output",
            str(self.out),
            "--pid",
            str(self.pid),
        ]
        if self.native:
            cmd.append("--native")  # C frames too: syscalls, the GC, uvloop
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            print(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


def _location(frame: str) -> str:
    """'func (path/file.py:12)' -> 'path/file.py'; native frames: 'write (libc.so.6)' -> 'libc.so.6'."""
    loc = frame[frame.rfind("(") + 1 :].rstrip(")")
    head, sep, tail = loc.rpartition(":")
    return head if sep and tail.isdigit() else loc


def _is_python(frame: str) -> bool:
    return ".py:" in frame or "<frozen " in frame


def _bucket(frame: str) -> str:
    """Which package a py-spy frame belongs to (py-spy prints paths relative to sys.path)."""
    path = _location(frame)
    if not _is_python(frame):
        return f"native: {path}"
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    if path.startswith("backstream/"):
        return path
    if path.startswith("/") or path.startswith("<"):
        return path
    return path.split("/", 1)[0].removesuffix(".py")


def _short(frame: str) -> str:
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in loc:
            loc = loc.split(marker, 1)[1]
    return f"{name} ({loc})"


def summarise_profile(path: Path, top: int = 18) -> str:
    """Top functions by own (self) samples and by inclusive samples, plus own samples by package.

    Samples of the idle thread-pool worker (the SDK starts one for a platform probe) are
    dropped: py-spy does not see that it is blocked on its queue.
    """
    own: Counter = Counter()
    own_py: Counter = Counter()  # native leaves charged to the nearest Python frame
    incl: Counter = Counter()
    pkg: Counter = Counter()
    pkg_py: Counter = Counter()
    total = dropped = 0
    native = False
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        py = [f for f in frames if _is_python(f)]
        if py and py[-1].startswith("_worker (") and "concurrent/futures/thread.py" in py[-1]:
            dropped += count
            continue
        native = native or not _is_python(frames[-1])
        total += count
        own[frames[-1]] += count
        pkg[_bucket(frames[-1])] += count
        if py:
            own_py[py[-1]] += count
            pkg_py[_bucket(py[-1])] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "(empty profile)"

    out = [f"py-spy: {total} samples of the server while busy ({dropped} of an idle pool thread dropped)"]
    out.append("\nown time by package:")
    out.append(table(["package", "own %"], [[k, 100 * v / total] for k, v in pkg.most_common(top)]))
    out.append("\ntop functions by own time:")
    out.append(table(["function", "own %"], [[_short(k), 100 * v / total] for k, v in own.most_common(top)]))
    if native:
        out.append("\nown time by package, native time charged to the Python frame that called it:")
        out.append(table(["package", "own %"], [[k, 100 * v / total] for k, v in pkg_py.most_common(top)]))
        out.append("\ntop Python functions by own time (native time charged to the Python frame that called it):")
        out.append(table(["function", "own %"], [[_short(k), 100 * v / total] for k, v in own_py.most_common(top)]))
    out.append("\ntop functions by inclusive time (skipping frames in more than 90% of samples):")
    rows = [[_short(k), 100 * v / total] for k, v in incl.most_common() if v / total < 0.9][:top]
    out.append(table(["function", "incl %"], rows))
    return "\n".join(out)


# ------------------------------------------------------------------ wire dialects


def dialect_request(dialect: str, port: int, max_tokens: int, messages: list[dict[str, Any]]) -> bytes:
    """The same request as native A, in a dialect's wire format."""
    if dialect == "anthropic":
        body = {"model": "fake", "max_tokens": max_tokens, "messages": messages, "stream": True}
        return build_request("/v1/messages", port, body, "anthropic-version: 2023-06-01\r\n")
    if dialect == "chat":
        body = {"model": "fake", "max_tokens": max_tokens, "messages": messages, "stream": True}
        return build_request("/v1/chat/completions", port, body)
    body = {"model": "fake", "max_output_tokens": max_tokens, "input": messages, "stream": True}
    return build_request("/v1/responses", port, body)


def background_report(results: list[RoundResult], direct: dict[str, Any]) -> dict[str, Any]:
    """Background rounds against direct in the same run: throughput ratio, TTFT p99 overhead, server CPU per run."""
    rounds = [r for r in results if r.side == BACKGROUND]
    stats = side_stats(rounds)
    out = {
        "requests_per_s": stats["requests_per_s"],
        "ttft_p99_ms": stats["ttft_p99_ms"],
        "background_throughput_ratio": stats["requests_per_s"] / direct["requests_per_s"]
        if direct["requests_per_s"]
        else float("nan"),
        "background_ttft_p99_overhead_ms": stats["ttft_p99_ms"] - direct["ttft_p99_ms"],
        "cpu_ms_per_run": cpu_ms_per_request(rounds, "server"),
        "errors": stats["errors"],
    }
    print("\nbackground runs (POST /v1/messages/async, then watch), against direct in the same rounds:")
    rows = [
        [name, fmt(out[name], 3), goal_text(name), goal_met(name, out[name])]
        for name in ("background_throughput_ratio", "background_ttft_p99_overhead_ms")
    ]
    rows.append(["server CPU per run, ms", fmt(out["cpu_ms_per_run"]), "", ""])
    print(table(["metric", "value", "goal", "met"], rows, align="lrll"))
    return out


def dialect_report(
    results: list[RoundResult], dialects: list[str], native_cpu: float
) -> tuple[list[list[Any]], dict[str, Any]]:
    """Per dialect: throughput, server CPU per request and its difference from the native format."""
    rows, out = [], {}
    for d in dialects:
        rounds = [r for r in results if r.side == d]
        stats = side_stats(rounds)
        cpu = cpu_ms_per_request(rounds, "server")
        overhead = cpu - native_cpu
        met = goal_met("dialect_cpu_overhead_ms", overhead)
        rows.append([d, stats["requests_per_s"], cpu, overhead, goal_text("dialect_cpu_overhead_ms"), met])
        out[d] = {**stats, "cpu_ms_per_request": cpu, "cpu_overhead_ms": overhead, "goal_met": met}
    return rows, out


# ------------------------------------------------------------------ main


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: null instead; floats rounded for readability."""
    if isinstance(value, float):
        return None if value != value else round(value, 4)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", "-c", type=int, default=64, help="concurrent clients (default 64)")
    ap.add_argument("--seconds", "-s", type=float, default=8.0, help="measurement window per round (default 8)")
    ap.add_argument("--rounds", "-r", type=int, default=3, help="rounds per side, alternating A/B (default 3)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per response (default 64)")
    ap.add_argument("--ttft-ms", type=float, default=20.0, help="fake upstream time to first token (default 20)")
    ap.add_argument("--delay-ms", type=float, default=5.0, help="fake upstream delay between tokens (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unrecorded warm-up seconds per side first (default 1)")
    ap.add_argument(
        "--startups", type=int, default=3, help="server start-ups to time; the median is reported (default 3)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: C=8, 2 s, 1 round, 0.5 s warm-up, 1 start-up")
    ap.add_argument(
        "--py-spy",
        metavar="FILE",
        help="profile the server with py-spy during the Backstream rounds "
        "(collapsed stacks to FILE, summary printed; perturbs the numbers a little)",
    )
    ap.add_argument("--py-spy-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    ap.add_argument("--py-spy-native", action="store_true", help="with --py-spy: sample native (C) frames too")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, server log)")
    ap.add_argument(
        "--background",
        action="store_true",
        help="also run background rounds: POST /v1/messages/async, then watch it (timed from the POST)",
    )
    ap.add_argument(
        "--store", choices=["memory", "sqlite", "redis"], default="memory", help="the server's store (default memory)"
    )
    ap.add_argument(
        "--unconfigured-concurrency",
        action="store_true",
        help="leave max_concurrency out of the model entry (issue 13: no hidden cap for remote models)",
    )
    ap.add_argument(
        "--dialect",
        choices=["native", *DIALECTS, "all"],
        default="native",
        help="also run rounds through a wire dialect (or all three), compared with the native format (default native)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.seconds, args.rounds, args.warmup, args.startups = 8, 2.0, 1, 0.5, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = source_version()
    work = make_work_dir("backstream-bench-")
    spec = f"tokens={args.tokens};ttft_ms={args.ttft_ms:g};delay_ms={args.delay_ms:g}"
    fake = FakeUpstreamProcess(work)
    servers: list[ServerProcess] = []
    try:
        fake.start()
        config = (
            f"store: {args.store}\n"
            "log_level: warning\n"
            "models:\n"
            "  - name: fake\n"
            "    provider: openai\n"
            f"    base_url: http://{HOST}:{fake.port}/v1\n"
            f'    model: "{spec}"\n'
            + ("" if args.unconfigured_concurrency else "    max_concurrency: 1024\n")
            + "    retries: 0\n"
        )
        startups: list[float] = []
        for k in range(max(1, args.startups)):
            s = ServerProcess(work, config)
            servers.append(s)
            s.start()
            startups.append(s.startup_s)
            if k < max(1, args.startups) - 1:
                s.stop()
        server = servers[-1]
        time.sleep(0.5)
        idle_rss = rss_mb(server.pid)

        max_tokens = max(100, args.tokens + 16)
        messages = [{"role": "user", "content": "hi"}]
        bs_request = build_request(
            "/v1/messages",
            server.port,
            {"model": "fake", "max_tokens": max_tokens, "messages": messages, "stream": True},
        )
        # What the gateway itself sends upstream (same spec, max_tokens and usage chunk),
        # so the fake does identical work on both sides.
        direct_request = build_request(
            "/v1/chat/completions",
            fake.port,
            {
                "model": spec,
                "messages": messages,
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        target = {BACKSTREAM: (server.port, bs_request), DIRECT: (fake.port, direct_request)}
        dialects = list(DIALECTS) if args.dialect == "all" else [d for d in DIALECTS if d == args.dialect]
        target.update({d: (server.port, dialect_request(d, server.port, max_tokens, messages)) for d in dialects})
        background = [BACKGROUND] if args.background else []
        body = {"model": "fake", "max_tokens": max_tokens, "messages": messages}
        target[BACKGROUND] = (server.port, build_request("/v1/messages/async", server.port, body))
        sides = [BACKSTREAM, *dialects, *background, DIRECT]
        watch = {"server": server.pid, "fake": fake.pid}
        # Stagger client starts over one ideal request duration so they do not march in lockstep.
        ideal_s = (args.ttft_ms + max(0, args.tokens - 1) * args.delay_ms) / 1000
        stagger = max(0.05, ideal_s)

        spy = (
            PySpy(server.pid, Path(args.py_spy).resolve(), args.py_spy_rate, args.py_spy_native)
            if args.py_spy
            else None
        )
        results: list[RoundResult] = []

        async def run_all() -> None:
            if args.warmup > 0:
                for side in sides:
                    port, req = target[side]
                    await run_round(side, -1, port, req, args.concurrency, args.warmup, stagger, args.tokens, watch)
            for i in range(args.rounds):
                for side in sides:
                    port, req = target[side]
                    if spy and side == BACKSTREAM and i == 0:
                        spy.start()
                        await asyncio.sleep(0.5)  # let py-spy attach
                    r = await run_round(side, i, port, req, args.concurrency, args.seconds, stagger, args.tokens, watch)
                    results.append(r)
                    print(
                        f"  round {i + 1}/{args.rounds} {side:<10} {len(r.in_window) / r.seconds:7.1f} req/s  "
                        f"ok {r.completed}  failed {r.failed}  "
                        f"server cpu {1000 * r.cpu_s['server'] / max(1, r.completed):.2f} ms/req  "
                        f"fake cpu {1000 * r.cpu_s['fake'] / max(1, r.completed):.2f} ms/req  "
                        f"machine busy {100 * r.machine_busy_frac:.0f}%",
                        flush=True,
                    )

        print(
            f"sync_stream: C={args.concurrency}, {args.rounds} x {args.seconds:g} s per side, "
            f"upstream spec {spec!r}, {os.cpu_count()} CPUs, source {version}",
            flush=True,
        )
        with RssSampler(server.pid) as sampler:
            try:
                import uvloop

                uvloop.run(run_all())
            except ImportError:  # pragma: no cover
                asyncio.run(run_all())
        if spy:
            spy.stop()
        hwm = peak_rss_mb(server.pid)
        peak_rss = max(sampler.peak, hwm or 0.0)
        rss_after = rss_mb(server.pid)
    finally:
        for s in servers:
            s.stop()
        fake.stop()

    a = [r for r in results if r.side == BACKSTREAM]
    b = [r for r in results if r.side == DIRECT]
    sa, sb = side_stats(a), side_stats(b)
    ratio = sa["requests_per_s"] / sb["requests_per_s"] if sb["requests_per_s"] else float("nan")
    overhead = sa["ttft_p99_ms"] - sb["ttft_p99_ms"]
    cpu_bs = cpu_ms_per_request(a, "server")
    cpu_fake_direct = cpu_ms_per_request(b, "fake")
    cpu_fake_bs = cpu_ms_per_request(a, "fake")
    startup = median(startups)

    print()
    print(
        table(
            [
                "side",
                "req/s",
                "tok/s",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "TTFT max ms",
                "latency p50 ms",
                "latency p99 ms",
                "ok",
                "errors",
                "loadgen cpu %",
                "machine busy %",
            ],
            [
                [
                    name,
                    s["requests_per_s"],
                    s["tokens_per_s"],
                    s["ttft_p50_ms"],
                    s["ttft_p99_ms"],
                    s["ttft_max_ms"],
                    s["latency_p50_ms"],
                    s["latency_p99_ms"],
                    s["requests_completed"],
                    s["errors"],
                    s["loadgen_cpu_pct"],
                    s["machine_busy_pct"],
                ]
                for name, s in ((f"A {BACKSTREAM}", sa), (f"B {DIRECT}", sb))
            ],
        )
    )
    print()
    rows = [
        [
            "throughput ratio backstream/direct",
            fmt(ratio, 3),
            goal_text("throughput_ratio"),
            goal_met("throughput_ratio", ratio),
        ],
        [
            "TTFT p99 overhead (A p99 - B p99), ms",
            fmt(overhead),
            goal_text("ttft_p99_overhead_ms"),
            goal_met("ttft_p99_overhead_ms", overhead),
        ],
        [
            "Backstream CPU per request, ms",
            fmt(cpu_bs),
            goal_text("cpu_ms_per_request"),
            goal_met("cpu_ms_per_request", cpu_bs),
        ],
        [
            "Backstream RSS idle after start-up, MB",
            fmt(idle_rss, 1),
            goal_text("idle_rss_mb"),
            goal_met("idle_rss_mb", idle_rss),
        ],
        ["Backstream RSS peak during run, MB", fmt(peak_rss, 1), "", ""],
        ["Backstream RSS idle after run, MB", fmt(rss_after, 1), "", ""],
        [
            "Backstream start-up to /healthz 200, s (median)",
            fmt(startup, 3),
            goal_text("startup_s"),
            goal_met("startup_s", startup),
        ],
        ["  start-up samples, s", " ".join(fmt(x, 3) for x in startups), "", ""],
        ["fake upstream CPU per request, direct rounds, ms", fmt(cpu_fake_direct), "(reference)", ""],
        ["fake upstream CPU per request, Backstream rounds, ms", fmt(cpu_fake_bs), "(reference)", ""],
        ["per-round req/s, backstream", " ".join(fmt(x, 1) for x in sa["per_round_rps"]), "", ""],
        ["per-round req/s, direct", " ".join(fmt(x, 1) for x in sb["per_round_rps"]), "", ""],
    ]
    print(table(["metric", "value", "goal", "met"], rows, align="lrll"))

    background_result = background_report(results, sb) if args.background else None
    dialect_rows, dialect_results = dialect_report(results, dialects, cpu_bs)
    if dialect_rows:
        print("\nwire dialects, each against native A in the same rounds:")
        print(
            table(
                ["side", "req/s", "server CPU ms/req", "minus native, ms", "goal", "met"], dialect_rows, align="lrrrll"
            )
        )

    errs = error_summary(results)
    if errs:
        print("\nerrors:")
        for text, n in errs.most_common(10):
            print(f"  {n:6d}  {text}")
    if spy and spy.out.exists():
        print()
        print(summarise_profile(spy.out))

    result = {
        "source": version,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "tokens": args.tokens,
        "ttft_ms": args.ttft_ms,
        "delay_ms": args.delay_ms,
        "cpus": os.cpu_count(),
        "backstream": {k: v for k, v in sa.items()},
        "direct": {k: v for k, v in sb.items()},
        "throughput_ratio": ratio,
        "ttft_p99_overhead_ms": overhead,
        "cpu_ms_per_request": cpu_bs,
        "fake_cpu_ms_per_request_direct": cpu_fake_direct,
        "fake_cpu_ms_per_request_backstream": cpu_fake_bs,
        "idle_rss_mb": idle_rss,
        "peak_rss_mb": peak_rss,
        "rss_after_run_mb": rss_after,
        "startup_s": startup,
        "startup_samples_s": startups,
        "dialects": dialect_results,
        "background": _json_safe(background_result) if background_result else None,
        "errors": sa["errors"] + sb["errors"] + sum(d["errors"] for d in dialect_results.values()),
        "short_streams": sa["short_streams"] + sb["short_streams"],
        "goals_met": {
            "throughput_ratio": goal_met("throughput_ratio", ratio),
            "ttft_p99_overhead_ms": goal_met("ttft_p99_overhead_ms", overhead),
            "cpu_ms_per_request": goal_met("cpu_ms_per_request", cpu_bs),
            "idle_rss_mb": goal_met("idle_rss_mb", idle_rss),
            "startup_s": goal_met("startup_s", startup),
        },
    }
    print("RESULT " + json.dumps(_json_safe(result), separators=(",", ":")))
    if args.keep:
        print(f"(work dir kept: {work})", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
