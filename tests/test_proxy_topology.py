"""deploy/ recipes, run here: two replicas on Redis behind Debian's nginx configured as deploy/nginx.conf
(SSE passes unbuffered, a watch resumes on the other replica), and the systemd unit verified.

The Dockerfile is not built here (no Docker daemon); only its promises are read back.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from backstream.config import Settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.replicas import replica
from tests.support.runs import check_run, slow, start, wait_status
from tests.support.server import ROOT, ServerProcess, free_port
from tests.support.sse import parse_sse, parse_sse_prefix

DEPLOY = ROOT / "deploy"
UPSTREAM_HEADER = "X-Test-Upstream"  # added by the test's copy of the config: which replica answered


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    assert found, "nginx is needed (./dev.sh test installs Debian's nginx: ensure_nginx)"
    return found


def _sub(pattern: str, repl: str, text: str) -> str:
    new, n = re.subn(pattern, repl, text)
    assert n == 1, f"deploy/nginx.conf no longer has {pattern!r}"
    return new


def render_nginx(tmp: Path, ports: tuple[int, int], listen: int) -> Path:
    """deploy/nginx.conf with the replicas' ports, a free listen port and every path under tmp."""
    conf = (DEPLOY / "nginx.conf").read_text()
    conf = _sub(r"worker_processes auto;", "worker_processes 1;", conf)  # one worker: a strict round robin
    conf = _sub(r"server 127\.0\.0\.1:8081", f"server 127.0.0.1:{ports[0]}", conf)
    conf = _sub(r"server 127\.0\.0\.1:8082", f"server 127.0.0.1:{ports[1]}", conf)
    conf = _sub(r"listen 8080;", f"listen 127.0.0.1:{listen};", conf)
    conf = _sub(r"access_log \S+;", f"access_log {tmp}/access.log;", conf)
    temp = " ".join(
        f"{kind}_temp_path {tmp}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Backstream also sends `X-Accel-Buffering: no`; ignored here, so that what is tested is the config's own
    # directives (as for a proxy that does not know that header).
    extra = (
        f"{temp}\n    add_header {UPSTREAM_HEADER} $upstream_addr always;\n    proxy_ignore_headers X-Accel-Buffering;"
    )
    conf = _sub(r"http \{", f"http {{\n    {extra}", conf)
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@dataclass
class Topology:
    a: ServerProcess
    b: ServerProcess
    proxy: str

    def replica_of(self, resp: httpx.Response) -> str:
        return {f"127.0.0.1:{self.a.port}": "a", f"127.0.0.1:{self.b.port}": "b"}[resp.headers[UPSTREAM_HEADER]]


def _start_nginx(tmp: Path, conf: Path, url: str) -> subprocess.Popen[bytes]:
    argv = [nginx_binary(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
    proc = subprocess.Popen([*argv, "-g", f"daemon off; pid {tmp}/nginx.pid;"], stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        assert proc.poll() is None, (tmp / "error.log").read_text()
        try:
            if httpx.get(url + "/healthz", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "nginx answered"
        time.sleep(0.05)


@pytest.fixture()
def topology(fake: FakeUpstream, tmp_path: Path, redis_db: str) -> Iterator[Topology]:
    prefix = f"bsproxy-{uuid.uuid4().hex[:8]}"
    a = replica(fake, tmp_path, prefix, "proxy-a", url=redis_db).start()
    b = replica(fake, tmp_path, prefix, "proxy-b", url=redis_db).start()
    listen = free_port()
    proxy = f"http://127.0.0.1:{listen}"
    nginx = None
    try:
        nginx = _start_nginx(tmp_path, render_nginx(tmp_path, (a.port, b.port), listen), proxy)
        yield Topology(a, b, proxy)
    finally:
        if nginx is not None:
            nginx.send_signal(signal.SIGTERM)  # fast shutdown: open SSE connections are closed
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(5)
        a.stop()
        b.stop()


def _read_frames(chunks: Iterator[bytes], n: int) -> tuple[list[dict[str, Any]], bytes]:
    """The first n frames from a streaming response's chunks, and the raw bytes read so far."""
    buf = b""
    for chunk in chunks:
        buf += chunk
        if len(parse_sse_prefix(buf)) >= n:
            return parse_sse_prefix(buf)[:n], buf
    raise AssertionError(f"stream ended before {n} events")


def test_sse_through_the_proxy_is_not_buffered(topology: Topology, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(n=50, delay=0.08))  # 4 s of tokens
    with topology.a.client() as direct, httpx.Client(base_url=topology.proxy, timeout=30) as via:
        mid = start(direct)
        with via.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            chunks = resp.iter_raw()
            first, buf = _read_frames(chunks, 1)
            # The first event is through while the run goes on: nginx passed it on, it did not wait for the body.
            assert first[0]["event"] == "stream_start"
            status = direct.get(f"/v1/messages/async/{mid}/status").json()
            assert status["status"] == "processing" and status["metadata"]["event_count"] < 10, status
            buf += b"".join(chunks)
        assert parse_sse(buf) == check_run(direct, mid)


def test_watch_resumes_on_the_other_replica_through_the_proxy(topology: Topology, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(n=80, delay=0.03))
    with topology.a.client() as direct, httpx.Client(base_url=topology.proxy, timeout=30) as via:
        mid = start(direct)
        with via.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
            assert resp.status_code == 200
            served_first = topology.replica_of(resp)
            before, _ = _read_frames(resp.iter_raw(), 6)
        # The watch was dropped mid-run; the next request goes to the other replica (round robin).
        assert direct.get(f"/v1/messages/async/{mid}/status").json()["status"] == "processing"
        last = str(before[-1]["id"])
        with via.stream("GET", f"/v1/messages/async/{mid}/stream", headers={"Last-Event-ID": last}) as resp:
            assert resp.status_code == 200
            assert topology.replica_of(resp) != served_first, "the resumed watch landed on the other replica"
            after = parse_sse(resp.read())
        wait_status(direct, mid, {"completed"})
        assert before + after == check_run(direct, mid), "no gap, no repeat"


def test_nginx_recipe_shape() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";'):
        assert directive in conf
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert read_timeout and int(read_timeout[1]) > Settings().keepalive_s, "quiet watches outlive the proxy"
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    assert body and int(body[1]) * 1024 * 1024 >= Settings().limits.max_body_bytes


def test_systemd_unit_recipe(tmp_path: Path) -> None:
    unit = (DEPLOY / "backstream.service").read_text()
    keys = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith(("#", "Environment"))
    )
    assert float(keys["TimeoutStopSec"]) > Settings().shutdown_grace_s
    assert keys["Restart"] == "on-failure" and keys["ExecStart"].startswith("/opt/backstream/venv/bin/backstream serve")
    assert keys["NoNewPrivileges"] == "yes" and keys["ProtectSystem"] == "strict"
    assert keys["ReadWritePaths"] == "/var/lib/backstream"
    verify = shutil.which("systemd-analyze")
    if verify:  # Debian's systemd here: check the unit as systemd reads it (ExecStart pointed at this venv)
        local = Path(sys.executable).parent / "backstream"
        path = tmp_path / "backstream.service"
        path.write_text(unit.replace("/opt/backstream/venv/bin/backstream", str(local)))
        out = subprocess.run([verify, "verify", str(path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_dockerfile_recipe() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "NOT BUILT HERE" in docker  # no Docker daemon on the machines this suite runs on
    assert re.search(r"^FROM python:3\.12-slim$", docker, re.M)
    assert re.search(r"^USER backstream$", docker, re.M) and "HEALTHCHECK" in docker and "/healthz" in docker
    assert "-c requirements.lock" in docker and "backstream install-local-model" in docker
