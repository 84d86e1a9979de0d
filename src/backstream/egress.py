"""Checks on every URL a request makes the server connect to (SSRF guard).

Only http(s); the host must be allow-listed when `egress.allow_hosts` is set; and,
unless the host is allow-listed or `egress.allow_private` is set, every address
it resolves to must be public: no loopback, private, link-local (cloud metadata
lives there), multicast, reserved or unspecified addresses. Redirects are checked
the same way before they are followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from .config import EgressSettings

_METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data"}


class EgressDenied(Exception):
    """The URL may not be fetched; the message says why."""


def _allowed_by_list(host: str, port: int, allow_hosts: list[str]) -> bool:
    return host in allow_hosts or f"{host}:{port}" in allow_hosts


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


async def check_url(url: str, egress: EgressSettings) -> None:
    """Raise EgressDenied unless the server may connect to `url`. Resolves the host (no connection is made)."""
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
    listed = _allowed_by_list(host, port, egress.allow_hosts)
    if egress.allow_hosts and not listed:
        raise EgressDenied(f"host {host!r} is not in egress.allow_hosts")
    if listed or egress.allow_private:
        return
    if host in _METADATA_HOSTS:
        raise EgressDenied(f"host {host!r} is a cloud metadata endpoint")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise EgressDenied(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    for ip in addresses:
        if not _public(ip):
            raise EgressDenied(f"{host!r} resolves to {ip}, a non-public address (set egress.allow_private or allow-list the host)")
