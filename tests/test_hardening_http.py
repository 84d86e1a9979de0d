"""HTTP server hardening over raw sockets: head size and time limits, slow bodies, the
connection cap, response headers, readiness without internals, and CORS."""

from __future__ import annotations

import hashlib
import re
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from backstream.config import ConfigError, load_settings
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.server import SECRETS, ServerProcess, fake_models
from tests.support.sse import parse_sse

KEY = "bsk_test_hardening_http_0123456789ab"
SECRETS.add(KEY)
AUTH = {"authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"
SECRET_PATH = "/nonexistent/internal-dir/model.gguf"
MAX_HEAD = 16384
MAX_CONNECTIONS = 4


@pytest.fixture(scope="module")
def guarded(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Short limits so that every guard can be watched firing within a test."""
    config = {
        "store": "memory",
        "models": [*fake_models(fake), {"name": "broken", "provider": "local", "path": SECRET_PATH}],
        "http": {"max_header_bytes": MAX_HEAD, "head_timeout_s": 1, "body_read_timeout_s": 1, "keepalive_timeout_s": 1},
        "cors": {"allow_origins": [ORIGIN]},
        "auth": {
            "api_keys": [{"name": "web", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenants": ["acme"]}]
        },
    }
    srv = ServerProcess(tmp_path_factory.mktemp("guarded"), config, name="guarded").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def capped(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {"store": "memory", "models": fake_models(fake), "http": {"max_connections": MAX_CONNECTIONS}}
    srv = ServerProcess(tmp_path_factory.mktemp("capped"), config, name="capped").start()
    yield srv
    srv.stop()


# --- raw socket helpers ---------------------------------------------------------------
def connect(srv: ServerProcess, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a content-length body: status, headers (lower-case names), body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def wait_eof(sock: socket.socket, timeout: float) -> bool:
    """True once the server closed the connection (whatever it sent before is dropped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: t\r\n{extra}\r\n".encode()


def server_rss_kib(srv: ServerProcess) -> int:
    assert srv.proc is not None
    status = Path(f"/proc/{srv.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


# --- point 3: request heads ---------------------------------------------------------------
def test_many_huge_header_lines_answered_431_with_bounded_memory(guarded: ServerProcess) -> None:
    rss_before = server_rss_kib(guarded)
    sock = connect(guarded)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n")
    line = b"x-big: " + b"a" * (1024 * 1024) + b"\r\n"
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent = 0
    # Up to 1000 lines of 1 MiB, stopping as soon as the server answers.
    while sent < 1000 and not sel.select(timeout=0):
        sock.sendall(line)
        sent += 1
    status, headers, body = read_response(sock)
    assert status == 431
    assert orjson.loads(body)["error"]["type"] == "request_too_large"
    assert headers["connection"] == "close"
    assert sent < 50, f"the server read {sent} MiB of headers before refusing"
    assert wait_eof(sock, 5)
    assert server_rss_kib(guarded) - rss_before < 64 * 1024


def test_head_just_over_the_limit_431_and_under_it_200(guarded: ServerProcess) -> None:
    def send_head(total: int) -> int:
        filler = "".join(f"x-h{i}: {'v' * 990}\r\n" for i in range(total // 1000))
        with connect(guarded) as sock:
            sock.sendall(get("/healthz", filler))
            return read_response(sock)[0]

    assert send_head(MAX_HEAD - 2000) == 200
    assert send_head(MAX_HEAD + 2000) == 431


def test_half_open_connections_closed_after_head_timeout(guarded: ServerProcess) -> None:
    silent = [connect(guarded) for _ in range(150)]
    partial = [connect(guarded) for _ in range(150)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n")
    dripping = connect(guarded)
    dripping.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    sel = selectors.DefaultSelector()
    for sock in [*silent, *partial, dripping]:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    received: dict[socket.socket, bytes] = {}
    closed: set[socket.socket] = set()
    deadline = started + 6
    while len(closed) < 301 and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.25):
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            received[sock] = received.get(sock, b"") + data
            if not data:
                closed.add(sock)
                sel.unregister(sock)
        if dripping not in closed:
            try:
                dripping.send(b"x")  # one header byte at a time: the head timeout is for the whole head
            except OSError:
                pass
    elapsed = time.monotonic() - started
    assert len(closed) == 301, f"{301 - len(closed)} connections still open after {elapsed:.1f} s"
    assert elapsed > 0.8
    assert all(received.get(s, b"") == b"" for s in silent)  # silent: closed without an answer
    assert all(received[s].startswith(b"HTTP/1.1 408 ") for s in partial)
    assert received[dripping].startswith(b"HTTP/1.1 408 ")
    for sock in [*silent, *partial, dripping]:
        sock.close()
    assert httpx.get(guarded.url + "/healthz").status_code == 200


def test_idle_keepalive_connection_closed(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(get("/healthz"))
        assert read_response(sock)[0] == 200
        started = time.monotonic()
        assert wait_eof(sock, 4), "an idle kept-alive connection stayed open"
        assert time.monotonic() - started > 0.8


def test_stalled_body_answered_408_trickling_body_read(guarded: ServerProcess) -> None:
    with connect(guarded) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
            + KEY.encode()
            + b'\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"max_'
        )
        started = time.monotonic()
        status, _, body = read_response(sock)
        assert status == 408 and orjson.loads(body)["error"]["type"] == "timeout_error"
        assert 0.8 < time.monotonic() - started < 4
        assert wait_eof(sock, 3)
    # The timeout is per read: a body that trickles in for longer than it in all is still read.
    body = b"[1,2]"
    with connect(guarded) as sock:
        sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: t\r\nauthorization: Bearer "
            + KEY.encode()
            + b"\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n"
        )
        for i in range(len(body)):  # 0.35 s per byte: longer than the 1 s timeout in all, never between reads
            time.sleep(0.35)
            sock.sendall(body[i : i + 1])
        status, _, answer = read_response(sock)
    assert status == 422, answer


# --- point 3: connection cap --------------------------------------------------------------
def _hold_connection(srv: ServerProcess) -> socket.socket:
    """A kept-alive connection that completed one request; retried while closes of earlier ones are still in flight."""
    deadline = time.monotonic() + 5
    while True:
        sock = connect(srv)
        sock.sendall(get("/healthz"))
        status = read_response(sock)[0]
        if status == 200:
            return sock
        sock.close()
        assert time.monotonic() < deadline, f"no connection accepted: {status}"


def test_connections_beyond_max_refused_cleanly_streams_unaffected(capped: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i}" for i in range(10)], delay=0.05)])
    with httpx.Client(base_url=capped.url, timeout=10) as stream_client:
        with stream_client.stream(
            "POST",
            "/v1/messages",
            json={"model": "gpt", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ) as streaming:
            assert streaming.status_code == 200
            holders = [_hold_connection(capped) for _ in range(MAX_CONNECTIONS - 1)]
            with connect(capped) as extra:
                extra.sendall(get("/healthz"))
                status, headers, body = read_response(extra)
                assert status == 503 and headers["retry-after"] == "1"
                assert orjson.loads(body)["error"]["type"] == "overloaded_error"
                assert wait_eof(extra, 3)
            holders[0].sendall(get("/healthz"))  # connections already open keep working at the limit
            assert read_response(holders[0])[0] == 200
            frames = parse_sse(streaming.read())
    assert frames[-1]["event"] == "stream_end" and frames[-1]["data"]["finish_reason"] == "Stop"
    assert "".join(f["data"]["delta"] for f in frames if f["event"] == "text_delta") == "".join(
        f"t{i}" for i in range(10)
    )
    holders.pop().close()
    _hold_connection(capped).close()  # room again once one closed
    for sock in holders:
        sock.close()


# --- point 11: headers and information ------------------------------------------------------
def test_security_headers_and_no_server_banner(guarded: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["a", "b"])])
    with guarded.client() as c:
        responses = [
            c.get("/healthz"),
            c.get("/v1/models", headers=AUTH),
            c.get("/v1/models"),  # 401
            c.get("/nope"),  # 404
            c.post(
                "/v1/messages",
                headers=AUTH,
                json={"model": "gpt", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            ),
        ]
    assert [r.status_code for r in responses] == [200, 200, 401, 404, 200]
    assert responses[-1].headers["content-type"].startswith("text/event-stream")
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        assert r.headers["cache-control"] == "no-store", r.url
        assert "server" not in r.headers, r.url


def test_readyz_names_component_without_internals(guarded: ServerProcess) -> None:
    resp = httpx.get(guarded.url + "/readyz")
    assert resp.status_code == 503
    details = resp.json()["error"]["details"]
    assert [d["field"] for d in details] == ["models.broken"]
    assert "internal-dir" not in resp.text and "/nonexistent" not in resp.text
    assert SECRET_PATH in guarded.log_path.read_text()  # the detail is logged server-side


def test_cors_preflight_before_auth_and_headers_exposed(guarded: ServerProcess, capped: ServerProcess) -> None:
    asked = "authorization, content-type, x-tenant, last-event-id, x-request-id"
    with guarded.client() as c:
        pre = c.options(
            "/v1/messages",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": asked,
            },
        )
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == ORIGIN
        allowed = {h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
        assert {h.strip() for h in asked.split(",")} <= allowed
        assert "access-control-allow-credentials" not in pre.headers
        foreign = c.options(
            "/v1/messages", headers={"origin": "https://evil.example", "access-control-request-method": "POST"}
        )
        assert "access-control-allow-origin" not in foreign.headers
        ok = c.get("/v1/models", headers={**AUTH, "origin": ORIGIN})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
        denied = c.get("/v1/models", headers={"origin": ORIGIN})  # the browser may read the error too
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    # off by default
    pre = httpx.options(
        capped.url + "/v1/messages", headers={"origin": ORIGIN, "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in pre.headers


@pytest.mark.parametrize(
    ("cors", "problem"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "'\\*' cannot be combined with allow_credentials"),
        ({"allow_origins": ["https://app.example/"]}, "is not an origin"),
    ],
)
def test_cors_config_refused(cors: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(environ={}, cors=cors)
