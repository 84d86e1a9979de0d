"""Streamed bodies skip the middleware that only look at a response's start.

Every middleware of ours (request id, security headers, store outage, access log,
tracing) and Starlette's error handlers wrap `send` only to see `http.response.start`.
An SSE stream sends one body message per event, to every watcher: through six wrappers
that is six coroutine calls per frame. This middleware, outermost, keeps the server's
own `send` in the scope so a streaming response can send its start and its last
message through the chain (every middleware sees both) and the frames in between
directly.

Invariant it relies on: no middleware inside it reads or changes body messages. One
that needs to must be added outside it, or streaming responses must stop using the
shortcut.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

DIRECT_SEND = "backstream.direct_send"  # scope key: the server's send, for the frames of a started stream


class DirectBodySend:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        await self.app(scope, receive, send)
