"""Helpers shared by the benchmarks: subprocesses, resource sampling, statistics, tables.

Standard library plus psutil (in the project's `test` extra), and tests/support, which the
benchmarks share with the test suite (the fake upstream, free_port).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks run as scripts; tests.support lives under the repo root

from tests.support.server import free_port  # noqa: E402

# ------------------------------------------------------------------ statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list; nan if empty."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if n == 1:
        return sorted_values[0]
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def median(values: list[float]) -> float:
    return percentile(sorted(values), 50)


# ------------------------------------------------------------------ provenance


def source_version() -> str:
    """The commit being measured, with '+dirty' when src/ has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


# ------------------------------------------------------------------ processes


def clean_env() -> dict[str, str]:
    """The environment for child processes: no BACKSTREAM_* overrides leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    """SIGTERM the child we started, then SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class FakeUpstreamProcess:
    """`python -m tests.support.fake_upstream --port 0` in its own process (cwd = repo root)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "fake_upstream.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> FakeUpstreamProcess:
        err = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_upstream", "--host", HOST, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=ROOT,
            env=clean_env(),
        )
        err.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        # The first stdout line is "READY http://127.0.0.1:PORT".
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"READY "):
                self.port = int(line.decode().strip().rsplit(":", 1)[1])
                return self
            if not line and self.proc.poll() is not None:
                break
        stop_process(self.proc)
        raise RuntimeError(f"fake upstream did not start (last line {line!r}); see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def http_get_status(port: int, path: str, timeout: float = 0.5) -> int | None:
    """One bare HTTP/1.1 GET; the status code, or None if nothing answered."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                got = s.recv(4096)
                if not got:
                    break
                data += got
    except OSError:
        return None
    parts = data.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


class ServerProcess:
    """`python -m backstream serve` with a temp config and data dir, timed until /healthz answers 200."""

    def __init__(self, work_dir: Path, config_yaml: str, name: str = "backstream") -> None:
        self.work_dir = work_dir
        self.config_path = work_dir / f"{name}.yaml"
        self.config_path.write_text(config_yaml)
        self.data_dir = work_dir / f"{name}-data"
        self.log_path = work_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.startup_s = float("nan")

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.port = free_port()
        log = open(self.log_path, "ab")
        cmd = [
            sys.executable,
            "-m",
            "backstream",
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir, env=clean_env())
        log.close()
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http_get_status(self.port, "/healthz") == 200:
                self.startup_s = time.perf_counter() - t0
                return self
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"server did not answer /healthz within {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        stop_process(self.proc)


def make_work_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


# ------------------------------------------------------------------ resources


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its (live) descendants."""
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    total = t.user + t.system
    for child in p.children(recursive=True):
        try:
            ct = child.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def rss_mb(pid: int) -> float:
    """RSS of a process and its live descendants (`serve --workers N`: the supervisor and its workers)."""
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for child in p.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total / (1024 * 1024)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (the kernel's RSS high-water mark) from /proc, Linux only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds summed over cores, total CPU seconds) since boot, to diff later."""
    import psutil

    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


class RssSampler:
    """Samples a process's RSS in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


# ------------------------------------------------------------------ output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A plain-text table; `align` is one char per column, 'l' or 'r' (default: first l, rest r)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=False)
        ).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to the hard one (children inherit it); returns it.

    Thousands of watcher sockets need more than the common default of 1024.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
