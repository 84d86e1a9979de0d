"""A lean HTTP/1.1 transport for the official SDKs' httpx2 clients.

The SDKs still build, authenticate and send every request and map its errors;
this only replaces how bytes move. Measured on this machine (bench/README.md):
reading a 64-token stream through httpx2's default transport (httpcore2 + anyio)
costs about 3 ms of CPU, through asyncio directly under 1 ms, and on Python 3.11
each anyio cancel scope per read also pays a getpid() syscall. So: an asyncio
protocol, httptools (already uvicorn's parser) for the response, a keep-alive pool,
and read timeouts from one timer per wait instead of a cancel scope per read.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator

import httptools
import httpx2 as httpx

from ..config import EgressSettings
from ..egress import resolve_allowed

_Key = tuple[str, str, int]
MAX_IDLE_PER_HOST = 64


class _Connection(asyncio.Protocol):
    """One upstream connection; parses one response at a time."""

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.headers_done = False
        self.framed = False  # Content-Length or chunked; without either the body ends when the connection closes
        self.keep_alive = False
        self.complete = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = httpx.RemoteProtocolError(f"invalid HTTP response from upstream: {exc}")
            self._close_transport()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            if self.headers_done and not self.framed and exc is None:
                self.complete = True  # an HTTP/1.0-style body ends at EOF (httptools has no end-of-input call); closed, so never reused
            else:
                self.error = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        self._wake()

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful while parsing this message

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    # waiting
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        """Until something arrives (or the connection fails); ReadTimeout after `timeout`."""
        if self.error is not None:
            raise self.error
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        timer = loop.call_later(timeout, self._timeout) if timeout is not None else None
        try:
            await self.waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if self.error is not None and not self.chunks:
            raise self.error

    def _timeout(self) -> None:
        if self.error is None:
            self.error = httpx.ReadTimeout("timed out waiting for the upstream")
        self._close_transport()
        self._wake()

    def _close_transport(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.error is None and self.keep_alive


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: LeanTransport, conn: _Connection, read_timeout: float | None) -> None:
        self._transport = transport
        self._conn = conn
        self._timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                if len(conn.chunks) == 1:
                    yield conn.chunks.popleft()
                else:
                    data = b"".join(conn.chunks)
                    conn.chunks.clear()
                    yield data
                continue
            if conn.complete:
                break
            await conn.wait(self._timeout)
        self._release()

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._conn.reusable():
            self._transport._checkin(self._conn)
        else:
            self._conn._close_transport()  # a response cut short must not be reused: close it now


class LeanTransport(httpx.AsyncBaseTransport):
    """`egress`: for URLs a request supplied; each connection then goes only to addresses the rules allowed
    (resolved once, so no DNS rebinding), TLS still checking the name. Configured upstreams are trusted: None."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, egress: EgressSettings | None = None) -> None:
        self._ssl = ssl_context
        self._egress = egress
        self._idle: dict[_Key, list[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.host, port)
        body = await request.aread()
        head = self._head(request, body)
        read_timeout = timeouts.get("read")
        conn = self._checkout(key)
        for fresh in (conn is None, True):
            if fresh:
                conn = await self._connect(key, timeouts.get("connect"))
            assert conn is not None and conn.transport is not None
            conn.transport.write(head + body)
            try:
                while not conn.headers_done:
                    await conn.wait(read_timeout)
                break
            except httpx.RemoteProtocolError:
                conn._close_transport()
                if fresh or conn.status:
                    raise
                # An idle connection the server closed meanwhile: send once more on a new one.
            except BaseException:
                conn._close_transport()
                raise
        assert conn is not None
        return httpx.Response(
            conn.status,
            headers=conn.headers,
            stream=_Body(self, conn, read_timeout),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    @staticmethod
    def _head(request: httpx.Request, body: bytes) -> bytes:
        url = request.url
        target = url.raw_path or b"/"
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), target)]
        has_length = False
        for name, value in request.headers.raw:
            lower = name.lower()
            if lower == b"transfer-encoding":
                continue  # the body is sent whole, with its length
            if lower == b"content-length":
                has_length = True
            lines.append(name + b": " + value)
        if not has_length and (body or request.method in ("POST", "PUT", "PATCH")):
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _checkout(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn._reset()
                return conn
        return None

    def _checkin(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < MAX_IDLE_PER_HOST:
            conn.waiter = None
            idle.append(conn)
        else:
            conn._close_transport()

    async def _connect(self, key: _Key, timeout: float | None) -> _Connection:
        scheme, host, port = key
        ssl_context = None
        if scheme == "https":
            ssl_context = self._ssl or ssl.create_default_context()
        conn = _Connection(key)
        try:
            await asyncio.wait_for(self._open(conn, host, port, ssl_context), timeout)
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        return conn

    async def _open(self, conn: _Connection, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        addresses = [host] if self._egress is None else await resolve_allowed(host, port, self._egress)
        for i, address in enumerate(addresses):
            try:
                await loop.create_connection(
                    lambda: conn, address, port, ssl=ssl_context, server_hostname=host if ssl_context else None
                )
                return
            except OSError:
                if i == len(addresses) - 1:
                    raise

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn._close_transport()
        self._idle.clear()


def sdk_http_client(timeout: httpx.Timeout) -> httpx.AsyncClient | None:
    """An httpx2 client on the lean transport, or None (SDK default) when a proxy is configured."""
    import os

    if any(
        os.environ.get(v) for v in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    ):
        return None  # the default transport knows proxies; this one does not
    return httpx.AsyncClient(transport=LeanTransport(), timeout=timeout, follow_redirects=True)
