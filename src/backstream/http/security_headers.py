"""Response headers every answer carries (nosniff, no-store) and CORS."""

from __future__ import annotations

import logging
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import CorsSettings

log = logging.getLogger("backstream.http")

SECURITY_HEADERS = {"x-content-type-options": "nosniff", "cache-control": "no-store"}
SECURITY_RAW = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
CORS_ALLOW_HEADERS = ["Authorization", "Content-Type", "X-Tenant", "Last-Event-ID", "X-Request-Id"]
CORS_EXPOSE_HEADERS = ["X-Request-Id", "Retry-After"]


class SecurityHeaders:
    """Adds nosniff and no-store to every response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_RAW if k not in present]
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:
            # The client left (or was timed out) while its body was read: nobody to answer.
            log.info("client disconnected before its request body was read: %s %s", scope["method"], scope["path"])


def add_cors(app: Any, cors: CorsSettings) -> None:
    """Starlette's CORS middleware, outermost so that preflights are answered before authentication."""
    if not cors.allow_origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors.allow_origins,
        allow_credentials=cors.allow_credentials,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=CORS_ALLOW_HEADERS,
        expose_headers=CORS_EXPOSE_HEADERS,
        max_age=cors.max_age_s,
    )
