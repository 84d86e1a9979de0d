"""The egress rules (egress.py) in-process: which addresses count as globally routable, and that
connections go to exactly the address that was checked (one lookup per connection, name kept for TLS)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import httpcore2
import httpx2
import pytest

from backstream.config import EgressSettings
from backstream.egress import EgressDenied, PinnedBackend, PinnedTransport, check_url, is_globally_routable
from backstream.providers.transport import LeanTransport
from tests.support.tls import self_signed

NOT_GLOBAL = [
    "100.64.0.1",  # carrier-grade NAT
    "100.100.100.200",  # a cloud metadata address inside 100.64.0.0/10
    "169.254.169.254",
    "10.0.0.1",
    "127.0.0.1",
    "192.0.0.8",
    "198.18.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "0.0.0.0",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fec0::1",
    "ff0e::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::7f00:1",  # IPv4-compatible (deprecated)
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::6464:64c8",  # NAT64 of 100.100.100.200
    "64:ff9b:1::a00:1",  # local-use NAT64
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2001:0:808:808:0:0:f5ff:fffe",  # Teredo, client 10.0.0.1
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"]
OPEN = EgressSettings()


@pytest.mark.parametrize("address", NOT_GLOBAL)
async def test_non_global_addresses_are_refused(address: str) -> None:
    assert not is_globally_routable(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(EgressDenied, match="not a globally routable"):
        await check_url(f"http://{host}/mcp", OPEN)


@pytest.mark.parametrize("address", GLOBAL)
async def test_global_addresses_pass(address: str) -> None:
    assert is_globally_routable(ipaddress.ip_address(address))
    host = f"[{address}]" if ":" in address else address
    await check_url(f"https://{host}/mcp", OPEN)


async def test_allow_list_and_allow_private_open_the_rules() -> None:
    await check_url("http://100.100.100.200/x", EgressSettings(allow_hosts=["100.100.100.200"]))
    await check_url("http://[64:ff9b::a00:1]:8080/x", EgressSettings(allow_private=True))
    with pytest.raises(EgressDenied, match="allow_hosts"):
        await check_url("http://8.8.8.8/x", EgressSettings(allow_hosts=["example.com"]))


class _Resolver:
    """Stands in for DNS: answers a name with the next address of its list; counts lookups."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, answers: list[str]) -> None:
        self.name = name
        self.answers = answers
        self.lookups = 0
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
            if host != self.name:
                return await real(host, port, *args, **kw)
            address = self.answers[min(self.lookups, len(self.answers) - 1)]
            self.lookups += 1
            return await real(address, port, *args, **kw)

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


class _Recording(httpcore2.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def connect_tcp(
        self, host: str, port: int, timeout: Any = None, local_address: Any = None, socket_options: Any = None
    ) -> Any:
        self.hosts.append(host)
        return httpcore2.AsyncMockStream([])


async def test_rebinding_name_connects_only_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = _Resolver(monkeypatch, "rebind.test", ["8.8.8.8", "127.0.0.1"])
    inner = _Recording()
    backend = PinnedBackend(OPEN, inner)
    await backend.connect_tcp("rebind.test", 443)
    assert inner.hosts == ["8.8.8.8"] and resolver.lookups == 1, "one lookup; the socket goes to the address checked"
    with pytest.raises(EgressDenied, match="127.0.0.1"):
        await backend.connect_tcp("rebind.test", 443)  # the next connection is checked afresh
    assert inner.hosts == ["8.8.8.8"]


async def test_pinned_transport_keeps_the_name_for_tls_and_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server_ctx, client_ctx = self_signed(tmp_path)  # a certificate for "localhost" only
    resolver = _Resolver(monkeypatch, "localhost", ["127.0.0.1"])
    hosts: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hosts.extend(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    names: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    egress = EgressSettings(allow_hosts=[f"localhost:{port}"])
    try:
        async with httpx2.AsyncClient(transport=PinnedTransport(egress, verify=client_ctx)) as client:
            resp = await client.get(f"https://localhost:{port}/x")
        assert resp.text == "ok" and resolver.lookups == 1
        assert names == ["localhost"], "SNI carries the name, not the address"
        assert [h.lower() for h in hosts] == [f"host: localhost:{port}".encode()]
        with pytest.raises(EgressDenied):
            async with httpx2.AsyncClient(transport=PinnedTransport(EgressSettings(), verify=client_ctx)) as client:
                await client.get(f"https://localhost:{port}/x")  # not allow-listed: loopback is refused
    finally:
        server.close()
        await server.wait_closed()


async def test_lean_transport_with_egress_connects_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = _Resolver(monkeypatch, "localhost", ["127.0.0.1"])
    hosts: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hosts.extend(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx2.AsyncClient(
            transport=LeanTransport(egress=EgressSettings(allow_hosts=[f"localhost:{port}"]))
        ) as client:
            assert (await client.get(f"http://localhost:{port}/x")).text == "ok"
        assert resolver.lookups == 1 and [h.lower() for h in hosts] == [f"host: localhost:{port}".encode()]
        async with httpx2.AsyncClient(transport=LeanTransport(egress=EgressSettings())) as client:
            with pytest.raises(EgressDenied, match="127.0.0.1"):
                await client.get(f"http://localhost:{port}/x")
        assert len(hosts) == 1, "a refused address is never connected to"
    finally:
        server.close()
        await server.wait_closed()
