"""The lean upstream transport (providers/transport.py), over real sockets: the fake upstream and a TLS server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx2
import openai
import pytest

from backstream.providers.transport import LeanTransport, sdk_http_client
from tests.support.fake_upstream import FakeUpstream, Fault, Reply
from tests.support.tls import self_signed

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_keep_alive_reuses_connections(fake: FakeUpstream) -> None:
    fake.script("m", [Reply(tokens=["a", "b"])])
    before = fake.connections_accepted
    async with httpx2.AsyncClient(transport=LeanTransport()) as client:
        for _ in range(5):
            async with client.stream("POST", fake.base_url + "/chat/completions", json=BODY) as resp:
                assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
                data = b"".join([chunk async for chunk in resp.aiter_raw()])
            assert data.count(b"data: ") >= 4 and data.endswith(b"data: [DONE]\n\n")
    assert fake.connections_accepted - before == 1


async def test_read_timeout_and_early_close(fake: FakeUpstream) -> None:
    fake.script("m", [Reply(fault=Fault.HANG), Reply(tokens=[f"t{i}" for i in range(100)], delay=0.05)])
    async with httpx2.AsyncClient(transport=LeanTransport(), timeout=httpx2.Timeout(5, read=0.3)) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post(fake.base_url + "/chat/completions", json=BODY)
        async with client.stream("POST", fake.base_url + "/chat/completions", json=BODY) as resp:
            async for _ in resp.aiter_raw():
                break
    rec = fake.requests[-1]
    await asyncio.to_thread(fake.wait_for_client_close, rec, 2)


async def test_dropped_connection_raises(fake: FakeUpstream) -> None:
    fake.script("m", [Reply(tokens=["a", "b", "c"], fault=Fault.DROP, fault_after=1, delay=0.01)])
    async with httpx2.AsyncClient(transport=LeanTransport()) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            async with client.stream("POST", fake.base_url + "/chat/completions", json=BODY) as resp:
                async for _ in resp.aiter_raw():
                    pass


async def test_connect_error_maps_to_the_sdk_error() -> None:
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1:9/v1",
        api_key="x",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=LeanTransport()),
    )
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


def test_proxy_settings_fall_back_to_the_default_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(sdk_http_client(httpx2.Timeout(5)), httpx2.AsyncClient)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert sdk_http_client(httpx2.Timeout(5)) is None


async def test_tls_upstream(tmp_path: Path) -> None:
    server_ctx, client_ctx = self_signed(tmp_path)
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        seen.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx2.AsyncClient(transport=LeanTransport(ssl_context=client_ctx)) as client:
            resp = await client.post(f"https://localhost:{port}/v1/x", json={"a": 1})
            assert resp.status_code == 200 and resp.text == "data: one\n\ndata: two\n\n"
        assert seen == [b'{"a":1}'] or seen == [b'{"a": 1}']
        async with httpx2.AsyncClient(transport=LeanTransport()) as client:
            with pytest.raises(httpx2.ConnectError):
                await client.post(f"https://localhost:{port}/v1/x", json={})  # an unknown CA is refused
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
    ],
    ids=["http1.0", "http1.1-close"],
)
async def test_body_that_ends_at_connection_close(head: bytes) -> None:
    """No Content-Length, no chunking: the body is everything up to EOF, and that connection is never reused."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + b"hello ")
        await writer.drain()
        writer.write(b"world")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx2.AsyncClient(transport=LeanTransport()) as client:
            for _ in range(2):
                resp = await client.get(f"http://127.0.0.1:{port}/plain")
                assert resp.status_code == 200 and resp.text == "hello world"
            async with client.stream("GET", f"http://127.0.0.1:{port}/plain") as resp:
                assert b"".join([chunk async for chunk in resp.aiter_raw()]) == b"hello world"
        assert connections == 3, "a body delimited by close leaves no connection to reuse"
    finally:
        server.close()
        await server.wait_closed()


async def test_framed_body_cut_short_is_still_an_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx2.AsyncClient(transport=LeanTransport()) as client:
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.get(f"http://127.0.0.1:{port}/short")
    finally:
        server.close()
        await server.wait_closed()
