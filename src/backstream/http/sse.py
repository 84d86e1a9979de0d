"""ASGI responses that notice a client leaving at once, not at the next write.

Starlette's StreamingResponse only learns of a disconnect when a write fails; an
upstream that is slow or silent would keep generating (and billing) for a client
that is gone. These watch `http.disconnect` concurrently and cancel the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..events import KEEPALIVE
from .direct_body_send import DIRECT_SEND

T = TypeVar("T")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
]


class ClientGone(Exception):
    """The client disconnected while we were working for it."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone()
    return task.result()


class EventStreamResponse(Response):
    """Streams SSE frames; sends keep-alive comments while idle; stops the source when the client leaves."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[Any],
        *,
        keepalive_s: float = 15.0,
        headers: list[tuple[bytes, bytes]] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        head: bytes = b"",
        encode: Callable[[Any], bytes] | None = None,
    ) -> None:
        self.frames = frames  # bytes, or items that `encode` turns into bytes (saves a generator layer per event)
        self.head = head  # sent with the response headers
        self.encode = encode
        self.keepalive_s = keepalive_s
        self.status_code = 200
        self.background = None
        self.raw_headers = SSE_HEADERS + (headers or [])
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last_write = time.monotonic()
        # The start and the end go through every middleware; the frames between go straight to the
        # server (middleware here only look at the start: see direct_body_send.py).
        frame_send: Send = scope.get(DIRECT_SEND, send)

        async def pump() -> None:
            nonlocal last_write
            encode = self.encode
            if self.head:
                await frame_send({"type": "http.response.body", "body": self.head, "more_body": True})
            async for item in self.frames:
                body = encode(item) if encode else item
                await frame_send({"type": "http.response.body", "body": body, "more_body": True})
                last_write = time.monotonic()

        async def keepalive() -> None:
            nonlocal last_write
            while True:
                await asyncio.sleep(max(0.0, last_write + self.keepalive_s - time.monotonic()))
                if time.monotonic() - last_write >= self.keepalive_s:
                    await frame_send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                    last_write = time.monotonic()

        pump_task = asyncio.ensure_future(pump())  # the frames; the response ends when it does
        ticker = asyncio.ensure_future(keepalive())
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((pump_task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticker.cancel()
            watcher.cancel()
            gone = not pump_task.done()
            if gone:
                pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump_task
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                await self.on_close()
        if not gone:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
