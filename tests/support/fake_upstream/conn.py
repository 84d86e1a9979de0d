"""One client connection: bytes in through a single pending read, requests out of httptools.

At most one ``reader.read()`` is in flight per connection, held in a task
(``pending_read``). Reading a request awaits it; while a response is being written the
same task doubles as the watcher that notices the client going away (EOF or reset),
and bytes the client sends meanwhile (pipelining) are parsed into queued requests.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools

MAX_HEAD = 1 << 20  # a request head larger than this is refused with 400
READ_SIZE = 1 << 16


class BadRequest(Exception):
    pass


class Request:
    __slots__ = ("method", "path", "query", "version", "headers", "body", "keep_alive")

    def __init__(
        self, method: str, path: str, query: str, version: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


class _Parsing:
    """httptools callbacks: collects the request being parsed and queues complete ones."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[Request] = deque()
        self.error: str | None = None  # raised as BadRequest once the queued requests are served
        self.continue_due = False  # the client waits for "100 Continue" before its body
        self.head_bytes = 0  # bytes fed while no head was complete: the MAX_HEAD guard
        self.in_head = True
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Parse what arrived; an error is kept for later, not raised mid-response."""
        if self.error is not None:
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self.error = "header too large"
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.error = "protocol upgrades are not supported"
        except httptools.HttpParserError as e:
            self.error = f"bad request: {e}"

    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = {}
        self._body = []
        self.continue_due = False

    def on_url(self, url: bytes) -> None:
        self._url += url  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").strip().lower()
        text = value.decode("latin-1").strip()
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.continue_due = self._headers.get("expect", "").lower() == "100-continue"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        p = self.parser
        path, _, query = self._url.decode("latin-1").partition("?")
        version = f"HTTP/{p.get_http_version()}"
        body = b"".join(self._body)
        self.ready.append(
            Request(
                p.get_method().decode("latin-1").upper(),
                path,
                query,
                version,
                self._headers,
                body,
                p.should_keep_alive(),
            )
        )
        self.in_head = True


class Conn:
    __slots__ = ("reader", "writer", "eof", "aborted", "_rt", "_parsing")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.eof = False
        self.aborted = False
        self._rt: asyncio.Task | None = None
        self._parsing = _Parsing()

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(READ_SIZE)
        except Exception:  # connection reset and the like: same as EOF for us
            return b""

    def pending_read(self) -> asyncio.Task:
        t = self._rt
        if t is None:
            t = self._rt = asyncio.get_running_loop().create_task(self._read())
        return t

    def consume(self) -> bool:
        """Take the result of the finished pending read and parse it; False on EOF."""
        t = self._rt
        assert t is not None and t.done()
        self._rt = None
        data = t.result()
        if not data:
            self.eof = True
            return False
        self._parsing.feed(data)
        return True

    async def fill(self) -> bool:
        if self.eof:
            return False
        await self.pending_read()
        return self.consume()

    def cancel_read(self) -> None:
        t, self._rt = self._rt, None
        if t is not None and not t.done():
            t.cancel()

    async def read_request(self) -> Request | None:
        """The next request; None when the client closed the connection first."""
        parsing = self._parsing
        while True:
            if parsing.continue_due:
                parsing.continue_due = False
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if parsing.ready:
                return parsing.ready.popleft()
            if parsing.error is not None:
                raise BadRequest(parsing.error)
            if not await self.fill():
                return None
