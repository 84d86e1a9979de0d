"""Pure ASGI middleware: a request that finds the store out of reach is answered 503, not 500.

Outermost of our middleware, so it also covers authentication and rate limits (which
read the store on Redis). Once a response has started (an SSE stream) it cannot be
changed; watchers ride out outages themselves (see background.watch.OutageBackoff).
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..store import StreamStore
from .errors import error_response

log = logging.getLogger("backstream.store")

RETRY_AFTER_S = "1"


class StoreOutageGuard:
    """Answers 503 with Retry-After when a request fails because the store is out of reach."""

    def __init__(self, app: ASGIApp, store: StreamStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started or not self.store.unavailable(exc):
                raise
            log.warning(
                "%s %s: the store is out of reach (%s: %s); answered 503",
                scope["method"],
                scope["path"],
                type(exc).__name__,
                exc,
            )
            response = error_response(
                scope,
                503,
                "overloaded_error",
                "the run store is temporarily unavailable; retry shortly",
                headers={"retry-after": RETRY_AFTER_S},
            )
            await response(scope, receive, send)
