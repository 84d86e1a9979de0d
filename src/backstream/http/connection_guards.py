"""Connection guards: request-head limits, slow clients and a connection cap, below ASGI.

uvicorn's httptools protocol accepts request heads of any size (httptools buffers a
header value until it ends) and waits forever for a head or a body that never comes.
`guarded_protocol` returns a subclass that bounds both. Its additions run while a
request head or body is being read, never while a response (tokens) is written, and
`data_received` does O(1) extra work per call.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..config import HttpSettings
from ..events import new_ulid
from .errors import error_body
from .security_headers import SECURITY_RAW

log = logging.getLogger("backstream.http")

# A refused connection keeps reading (and dropping) what the client still sends for this
# long, so that closing does not reset the connection before the client read the answer.
LINGER_S = 1.0


_last_logged: dict[str, float] = {}


def _log_sparsely(kind: str, msg: str, *args: Any) -> None:
    """A flood of refused connections must not become a flood of log lines: one per kind per 10 s."""
    now = time.monotonic()
    if now - _last_logged.get(kind, -1e9) >= 10:
        _last_logged[kind] = now
        log.warning(msg, *args)


class _HeadTooLarge(Exception):
    """Raised inside a parser callback; httptools turns it into HttpParserCallbackError."""


def max_connections(configured: int) -> int:
    """The connection cap: as configured, or (0) half the open-file limit, leaving room for upstreams and the store."""
    if configured:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) // 2)


def guarded_protocol(http: HttpSettings) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass bound to these limits (uvicorn instantiates the class itself)."""
    limits = http.model_copy(update={"max_connections": max_connections(http.max_connections)})
    log.info(
        "http: max_connections %d, heads up to %d bytes in %s s",
        limits.max_connections,
        limits.max_header_bytes,
        limits.head_timeout_s,
    )
    return type("BoundGuardedProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Head size and time limits, a body read timeout, and a connection cap with a clean 503."""

    limits: HttpSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the next bytes belong to a request head (or are dropped, see _discarding)
        self._discarding = False
        self._head_received = 0  # bytes received since the current head began (coarse: may include a body)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_read_at = 0.0

    # --- connection ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            _log_sparsely("refused", "refusing connections: max_connections (%d) are open", self.limits.max_connections)
            self._answer_and_close(
                503, "overloaded_error", "too many open connections, retry later", [(b"retry-after", b"1")]
            )
            return
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._reading_head:  # a body, or bytes after a complete request: the common case
            if self._body_timer is not None:
                self._body_read_at = self.loop.time()
            super().data_received(data)
            return
        if self._discarding:
            return
        self._head_received += len(data)
        self._feed_head(data)
        if self._discarding or self.transport.is_closing():
            return
        if self._reading_head and self._head_received > self.limits.max_header_bytes:
            # httptools keeps one header line in memory until it ends: stop before it grows.
            self._reject_head_too_large()
        elif not self._reading_head and self.cycle is not None and self.cycle.more_body and self._body_timer is None:
            self._body_read_at = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_read_timeout_s, self._body_timed_out)

    def _feed_head(self, data: bytes) -> None:
        """uvicorn's data_received, except that a head our callback refused (and answered) is no parser error."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._discarding:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    # --- parser callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None and not self._discarding:  # a later request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._reject_head_too_large()
            raise _HeadTooLarge()  # stops the parser: nothing of this request reaches the application
        self._reading_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading_head = True
        self._head_received = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._discarding:  # else our own callback stopped the parser and has answered
            super().send_400_response(msg)

    # --- limits -------------------------------------------------------------------
    def _reject_head_too_large(self) -> None:
        _log_sparsely("431", "request head larger than %d bytes: answered 431", self.limits.max_header_bytes)
        self._answer_and_close(431, "request_too_large", f"request head exceeds {self.limits.max_header_bytes} bytes")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._discarding:
            return
        if self._head_received == 0:
            self.transport.close()  # idle and silent: nothing to answer
            return
        _log_sparsely("408head", "request head not received in %s s: answered 408", self.limits.head_timeout_s)
        self._answer_and_close(408, "timeout_error", "request head not received in time")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or self._reading_head or cycle is None:
            return
        idle = self.loop.time() - self._body_read_at
        if self.flow.read_paused or cycle.waiting_for_100_continue or idle < self.limits.body_read_timeout_s:
            # Data came since the timer was armed, or the application is not reading yet: not the client's fault.
            wait = self.limits.body_read_timeout_s - (idle if idle < self.limits.body_read_timeout_s else 0)
            self._body_timer = self.loop.call_later(wait, self._body_timed_out)
            return
        if cycle.response_started:
            self.transport.close()  # the application answered (or is answering) already: only cut
            return
        cycle.disconnected = True  # the application sees http.disconnect and may write nothing more
        cycle.message_event.set()
        _log_sparsely("408body", "request body stalled for %s s: answered 408", self.limits.body_read_timeout_s)
        self._answer_and_close(408, "timeout_error", "request body not received in time")

    def _answer_and_close(
        self, status: int, type_: str, message: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer with the shared error shape, then close after a short linger that drops what still comes in."""
        self._cancel_timers()
        self._reading_head = self._discarding = True
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self.transport.close()  # a (pipelined) response is under way: an answer now would corrupt it
            return
        body = error_body(type_, message, "req_" + new_ulid())
        headers = [*self.server_state.default_headers, *SECURITY_RAW, *(extra or [])]
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
