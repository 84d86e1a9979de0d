"""Checks on every URL a request makes the server connect to (SSRF guard).

Only http(s); the host must be allow-listed when `egress.allow_hosts` is set; and,
unless the host is allow-listed or `egress.allow_private` is set, every address
it resolves to must be globally routable: no loopback, private, carrier-grade NAT,
link-local (cloud metadata lives there), multicast, reserved or documentation
address, also not one hidden inside an IPv6 form (IPv4-mapped, NAT64, 6to4, Teredo).

A check alone is not enough: a name that resolves to a public address for the check
and to a private one for the connection (DNS rebinding) would pass. So connections
go through `PinnedBackend`, which resolves once, checks, and connects to exactly the
addresses it checked, while TLS (SNI, certificate) and the Host header keep the name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2

from .config import EgressSettings

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not global, whatever this Python's `is_global` says (its tables differ between releases).
_NOT_GLOBAL_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",
        "192.0.0.0/24",
        "192.88.99.0/24",
        "198.18.0.0/15",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
_NOT_GLOBAL_V6 = [ipaddress.ip_network(n) for n in ("64:ff9b:1::/48", "fec0::/10", "2001:db8::/32", "100::/64")]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class EgressDenied(Exception):
    """The URL may not be fetched; the message says why."""


def _global_v4(ip: ipaddress.IPv4Address) -> bool:
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _NOT_GLOBAL_V4)


def is_globally_routable(ip: IPAddress) -> bool:
    """Whether a connection to `ip` leaves for the public internet (IPv4 inside IPv6 forms judged by the IPv4)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _global_v4(ip)
    if ip.ipv4_mapped is not None:
        return _global_v4(ip.ipv4_mapped)
    if ip in _NAT64:  # the gateway translates to the embedded IPv4 address
        return _global_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    embedded = [*(ip.teredo or ()), *([ip.sixtofour] if ip.sixtofour is not None else [])]
    if not all(_global_v4(v4) for v4 in embedded):
        return False
    # ::/8 is reserved: it also holds the deprecated IPv4-compatible form ::a.b.c.d.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved) and not any(ip in net for net in _NOT_GLOBAL_V6)


def _allowed_by_list(host: str, port: int, allow_hosts: list[str]) -> bool:
    return host in allow_hosts or f"{host}:{port}" in allow_hosts


def check_url_shape(url: str, egress: EgressSettings) -> tuple[str, int]:
    """The URL's (host, port) if its form and host may be used; EgressDenied otherwise. No lookup is made."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise EgressDenied(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise EgressDenied("only http and https URLs are allowed")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise EgressDenied("the URL has no host")
    if parts.username or parts.password:
        raise EgressDenied("credentials in the URL are not allowed; use authorization_token")
    if egress.allow_hosts and not _allowed_by_list(host, port, egress.allow_hosts):
        raise EgressDenied(f"host {host!r} is not in egress.allow_hosts")
    return host, port


async def resolve_allowed(host: str, port: int, egress: EgressSettings) -> list[str]:
    """Resolve `host` once; the addresses the server may connect to, in resolver order. EgressDenied if any is not allowed."""
    host = host.lower().rstrip(".").strip("[]")
    listed = _allowed_by_list(host, port, egress.allow_hosts)
    if egress.allow_hosts and not listed:
        raise EgressDenied(f"host {host!r} is not in egress.allow_hosts")
    trusted = listed or egress.allow_private
    if host in _METADATA_HOSTS and not trusted:
        raise EgressDenied(f"host {host!r} is a cloud metadata endpoint")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]  # a literal address: nothing to resolve
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise EgressDenied(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise EgressDenied(f"{host!r} resolves to no address")
    if not trusted:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not is_globally_routable(ip):
                raise EgressDenied(
                    f"{host!r} resolves to {ip}, not a globally routable address (set egress.allow_private or allow-list the host)"
                )
    return addresses


async def check_url(url: str, egress: EgressSettings) -> None:
    """Raise EgressDenied unless the server may connect to `url`. Resolves the host (no connection is made)."""
    host, port = check_url_shape(url, egress)
    if egress.allow_private or _allowed_by_list(host, port, egress.allow_hosts):
        return  # nothing to check before connecting; the connection itself is still pinned
    await resolve_allowed(host, port, egress)


class PinnedBackend(httpcore2.AsyncNetworkBackend):
    """httpcore2's network backend, connecting only to addresses `resolve_allowed` returned for the host.

    httpcore2 passes the URL's host here and does TLS afterwards with that same host
    as server name, so SNI and certificate checks use the name, the socket the address.
    """

    def __init__(self, egress: EgressSettings, inner: httpcore2.AsyncNetworkBackend | None = None) -> None:
        self.egress = egress
        self.inner = inner or httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await resolve_allowed(host, port, self.egress)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore2.AsyncNetworkStream:
        raise EgressDenied("unix sockets are not reachable through egress")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class PinnedTransport(httpx2.AsyncHTTPTransport):
    """httpx2's default transport over a `PinnedBackend`: for clients that reach URLs a request supplied.

    No proxy: a proxy would resolve the name itself, after the check.
    """

    def __init__(self, egress: EgressSettings, verify: Any = True) -> None:
        super().__init__(verify=verify, trust_env=False)
        # httpx2 builds its pool without a way to pass a network backend; swap in an equal pool that has one.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(verify=verify, trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=PinnedBackend(egress),
        )
