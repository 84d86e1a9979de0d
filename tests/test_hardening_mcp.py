"""MCP hardening over real HTTP against real server processes: a stuck MCP server meets the setup
deadline without blocking other tenants, an SSE endpoint on another origin is refused at once,
configured MCP tokens never reach the store, and non-global addresses are refused."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis

from backstream.tools import redact_stored_request
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.mcp_server import McpHttpServer
from tests.support.runs import wait_status, watch
from tests.support.server import REDIS_URL, SECRETS, ServerProcess, fake_models
from tests.test_tools import call

USER = [{"role": "user", "content": "What is 2 + 3?"}]
API_KEY = "bsk_hardening_mcp_all_tenants_4242"
DOCS_TOKEN = "configured-docs-mcp-token-never-stored-58"
SECRETS.update({API_KEY, DOCS_TOKEN})
SETUP_DEADLINE_S = 2.0
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\r\n"


class RawServer:
    """A loopback server that reads a request head, sends `reply` (nothing when None), then holds the connection open."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers: list[asyncio.StreamWriter] = []

    def start(self) -> RawServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connected.set()
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.reply is not None:
                writer.write(self.reply)
                await writer.drain()
            await reader.read()  # until the client gives up
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for w in self._writers:
                w.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def mcp() -> Iterator[McpHttpServer]:
    server = McpHttpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def raw_servers() -> Iterator[dict[str, RawServer]]:
    servers = {
        "silent": RawServer(None).start(),  # accepts, never answers
        "mute_sse": RawServer(SSE_HEAD).start(),  # an SSE stream that never names its endpoint
        "foreign": RawServer(
            SSE_HEAD + b"event: endpoint\r\ndata: http://elsewhere.example:8000/messages/?session_id=1\r\n\r\n"
        ).start(),
    }
    yield servers
    for s in servers.values():
        s.stop()


def _allow(raw_servers: dict[str, RawServer]) -> dict[str, Any]:
    return {"allow_hosts": [f"127.0.0.1:{s.port}" for s in raw_servers.values()]}


@pytest.fixture(scope="module")
def gate(
    fake: FakeUpstream, raw_servers: dict[str, RawServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A queue of one and a short MCP setup deadline; one key for every tenant."""
    config = {
        "store": "sqlite",
        "models": fake_models(fake),
        "runs": {"queue_limit": 1, "tool_setup_timeout_s": SETUP_DEADLINE_S},
        "egress": _allow(raw_servers),
        "auth": {
            "api_keys": [
                {
                    "name": "ops",
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "tenants": ["*"],
                    "default_tenant": "acme",
                }
            ]
        },
    }
    srv = ServerProcess(tmp_path_factory.mktemp("gate"), config, name="gate").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def main(
    request: pytest.FixtureRequest,
    fake: FakeUpstream,
    mcp: McpHttpServer,
    raw_servers: dict[str, RawServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """A configured MCP server whose token comes from the environment; a long setup deadline."""
    config: dict[str, Any] = {
        "store": request.param,
        "models": fake_models(fake),
        "runs": {"tool_setup_timeout_s": 60},
        "egress": {"allow_hosts": [*_allow(raw_servers)["allow_hosts"], urlsplit(mcp.url).netloc]},
        "mcp_servers": [{"name": "docs", "url": mcp.url, "authorization_token_env": "DOCS_MCP_TOKEN"}],
    }
    if request.param == "redis":
        config["redis"] = {"url": request.getfixturevalue("redis_db"), "key_prefix": f"bshm-{os.getpid()}"}
    srv = ServerProcess(
        tmp_path_factory.mktemp(f"main-{request.param}"),
        config,
        env={"DOCS_MCP_TOKEN": DOCS_TOKEN},
        name=f"main-{request.param}",
    ).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize(("stuck", "path"), [("silent", "/mcp"), ("mute_sse", "/sse")])
def test_stuck_mcp_server_fails_at_the_deadline_and_blocks_no_other_tenant(
    gate: ServerProcess, fake: FakeUpstream, raw_servers: dict[str, RawServer], stuck: str, path: str
) -> None:
    server = raw_servers[stuck]
    server.connected.clear()
    fake.script("gpt-one-up", [Reply(tokens=["fine"])])
    acme = {"Authorization": f"Bearer {API_KEY}", "X-Tenant": "acme"}
    globex = {"Authorization": f"Bearer {API_KEY}", "X-Tenant": "globex"}
    # Both on gpt-one (max_concurrency 1): the stuck run must hold neither the queue nor the model slot.
    with gate.client(timeout=15) as c:
        started = time.monotonic()
        body = {
            "model": "gpt-one",
            "max_tokens": 8,
            "messages": USER,
            "mcp_servers": [{"name": stuck, "url": server.url(path)}],
        }
        resp = c.post("/v1/messages/async", headers=acme, json=body)
        assert resp.status_code == 200, resp.text
        stuck_id = resp.json()["message_id"]
        assert server.connected.wait(10), "the run is setting up its MCP server"
        resp = c.post(
            "/v1/messages/async", headers=globex, json={"model": "gpt-one", "max_tokens": 8, "messages": USER}
        )
        assert resp.status_code == 200, f"another tenant was refused while a run sat in MCP setup: {resp.text}"
        other = watch(c, resp.json()["message_id"], headers=globex)
        assert other[-1]["data"]["finish_reason"] == "Stop"
        frames = watch(c, stuck_id, headers=acme)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 5
        # The status is written just after the stream_end the watcher saw: wait for it.
        while (status := c.get(f"/v1/messages/async/{stuck_id}/status", headers=acme).json())["status"] == "processing":
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
    end = frames[-1]["data"]
    assert end["finish_reason"] == "Error" and repr(stuck) in end["error"]["message"]
    assert "runs.tool_setup_timeout_s" in end["error"]["message"]
    assert elapsed < SETUP_DEADLINE_S + 6, f"the run failed only after {elapsed:.1f} s"
    assert status["status"] == "failed" and repr(stuck) in status["error_message"]


def test_sse_endpoint_on_another_origin_is_refused_at_once(
    main: ServerProcess, fake: FakeUpstream, raw_servers: dict[str, RawServer]
) -> None:
    started = time.monotonic()
    with main.client(timeout=15) as c:
        resp = c.post(
            "/v1/messages",
            json={
                "model": "gpt",
                "messages": USER,
                "mcp_servers": [{"name": "foreign", "url": raw_servers["foreign"].url("/sse")}],
            },
        )
    elapsed = time.monotonic() - started
    assert resp.status_code == 502, resp.text
    message = resp.json()["error"]["message"]
    assert "'foreign'" in message and "another origin" in message
    assert elapsed < 10, f"refused only after {elapsed:.1f} s (the setup deadline is 60 s)"
    assert fake.requests == []


def _stored_bytes(srv: ServerProcess) -> bytes:
    """Everything the server's store holds: its data files, or every Redis value under its key prefix."""
    if srv.config["store"] == "sqlite":
        # The WAL keeps superseded page images until a checkpoint (SQLite runs one every 1000 pages);
        # what stays at rest for the retention period is what a checkpoint leaves.
        db = sqlite3.connect(srv.tmp / f"{srv.name}-data" / "backstream.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        return b"".join(p.read_bytes() for p in (srv.tmp / f"{srv.name}-data").rglob("*") if p.is_file())
    client = redis.Redis.from_url(REDIS_URL)
    out = []
    try:
        for key in client.scan_iter(f"{srv.config['redis']['key_prefix']}:*"):
            kind = client.type(key)
            if kind == b"hash":
                out += [k + v for k, v in client.hgetall(key).items()]
            elif kind == b"stream":
                out += [
                    orjson.dumps({k.decode(): v.decode() for k, v in fields.items()})
                    for _, fields in client.xrange(key)
                ]
            elif kind == b"string":
                out.append(client.get(key) or b"")
    finally:
        client.close()
    return b"".join(out)


def test_configured_mcp_token_never_reaches_the_store(
    main: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer
) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("add", {"a": 2, "b": 3})]), Reply(tokens=["5"])])
    mcp.authorizations.clear()
    with main.client() as c:
        resp = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER, "mcp_servers": [{"name": "docs"}]})
        assert resp.status_code == 200, resp.text
        mid = resp.json()["message_id"]
        frames = watch(c, mid)
        status = wait_status(c, mid, {"completed"})  # written just after the stream_end the watcher saw
    assert next(f["data"]["content"] for f in frames if f["event"] == "tool_result") == "5"
    assert frames[-1]["data"]["finish_reason"] == "Stop" and status["status"] == "completed"
    assert set(mcp.authorizations) == {f"Bearer {DOCS_TOKEN}"}, "the token is looked up when the run needs it"
    stored = _stored_bytes(main)
    assert mid.encode() in stored, "the check reads where the run is stored"
    assert DOCS_TOKEN.encode() not in stored


def test_request_mcp_token_is_dropped_from_the_store_when_the_run_ends(
    main: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer
) -> None:
    token = "request-supplied-mcp-token-77"
    SECRETS.add(token)
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("add", {"a": 1, "b": 1})]), Reply(tokens=["2"])])
    mcp.authorizations.clear()
    server = {"name": "mine", "url": mcp.url, "authorization_token": token}
    with main.client() as c:
        resp = c.post("/v1/messages/async", json={"model": "gpt", "messages": USER, "mcp_servers": [server]})
        assert resp.status_code == 200, resp.text
        mid = resp.json()["message_id"]
        frames = watch(c, mid)
        wait_status(c, mid, {"completed"})
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    assert set(mcp.authorizations) == {f"Bearer {token}"}, "the token was used while the run needed it"
    stored = _stored_bytes(main)
    assert mid.encode() in stored and b"mine" in stored
    assert token.encode() not in stored, "an ended run keeps no request-supplied secret"


def test_redact_stored_request_drops_request_tokens_only() -> None:
    raw = orjson.dumps(
        {
            "messages": USER,
            "mcp_servers": [
                {"name": "a", "url": "https://x.example/mcp", "authorization_token": "tok-1"},
                {"name": "docs"},
            ],
        }
    )
    redacted = orjson.loads(redact_stored_request(raw))
    assert redacted["mcp_servers"] == [{"name": "a", "url": "https://x.example/mcp"}, {"name": "docs"}]
    assert redacted["messages"] == USER
    plain = orjson.dumps({"messages": USER})
    assert redact_stored_request(plain) == plain


# One address end to end; the others are checked in-process in tests/test_core_validation.py.
@pytest.mark.parametrize("url", ["http://100.100.100.200/latest/meta-data"])
def test_non_global_request_urls_are_refused(http: httpx.Client, fake: FakeUpstream, url: str) -> None:
    resp = http.post(
        "/v1/messages", json={"model": "gpt", "messages": USER, "mcp_servers": [{"name": "x", "url": url}]}
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["field"] == "mcp_servers.0.url"
    assert "globally routable" in resp.json()["error"]["message"]
    assert fake.requests == []
