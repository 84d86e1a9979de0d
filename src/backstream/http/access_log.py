"""Pure ASGI middleware: one access line and the HTTP metrics per request, when its response has ended.

The line names method, path, status, duration, request id, tenant and key name (never a
credential); an SSE stream is logged when it ends, with its whole duration. Metrics use
the route template (`/v1/messages/async/{message_id}/stream`), never the raw path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import metrics

log = logging.getLogger("backstream.access")

UNMATCHED = "unmatched"  # no route: one label value for every unknown path


class AccessLogMiddleware:
    """Outermost of ours: sees every answer, including the ones middleware give themselves."""

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        response: dict[str, Any] = {"status": 0, "request_id": None, "watch": False}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                _note_start(scope, message, response)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if response["watch"]:
                metrics.WATCHERS_ACTIVE.dec()
            self._done(scope, response, time.monotonic() - started)

    def _done(self, scope: Scope, response: dict[str, Any], seconds: float) -> None:
        state = scope.get("state") or {}
        route = _route_of(scope)
        status = response["status"] or 500  # the app raised before answering: the server answers 500
        tenant = state.get("tenant")
        metrics.http_request(scope["method"], route, status, tenant, seconds)
        if not self.enabled:
            return
        principal = state.get("principal")
        fields = {
            "method": scope["method"],
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "request_id": state.get("request_id") or response["request_id"],
            "tenant": tenant,
            "key": getattr(principal, "name", None),
        }
        log.info(
            "%s %s %d %.1fms key=%s",
            scope["method"],
            scope["path"],
            status,
            fields["duration_ms"],
            fields["key"] or "-",
            extra={"fields": fields},
        )


def _note_start(scope: Scope, message: Message, response: dict[str, Any]) -> None:
    response["status"] = message["status"]
    for name, value in message.get("headers", ()):
        if name.lower() == b"x-request-id":
            response["request_id"] = value.decode("latin-1")
        elif name.lower() == b"content-type" and value.startswith(b"text/event-stream") and scope["method"] == "GET":
            response["watch"] = message["status"] == 200 and _route_of(scope).endswith("/stream")
    if response["watch"]:
        metrics.WATCHERS_ACTIVE.inc()


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED
