"""Pure ASGI middleware: every request gets an id (the client's, if well-formed) and every response carries it."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..events import new_ulid

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch only: `$` accepts a trailing newline


class RequestIdMiddleware:
    """Sets `state.request_id` for the error shape and logs, and adds `X-Request-Id` to the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else "req_" + new_ulid()
        scope.setdefault("state", {})["request_id"] = request_id
        logs.bind(request_id=request_id)  # this request's log lines carry it
        rid_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
