"""Pure ASGI middleware: a request body beyond limits.max_body_bytes is refused with 413, declared or streamed."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TooLarge
from .errors import answer


class BodyLimitMiddleware:
    """Refuses a too-large Content-Length at once, and stops a body that grows past the limit while read."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await answer(scope, receive, send, self._too_large())
            return
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise self._too_large()  # answered by the error handlers, like any domain error
            return message

        await self.app(scope, receive_limited, send)

    def _too_large(self) -> TooLarge:
        return TooLarge(f"request body exceeds {self.max_body_bytes} bytes")
