"""Pure ASGI middleware: one server span per HTTP request, under the caller's `traceparent`, when tracing is on.

The span is current while the request runs, so a run started by the request (synchronous, or a
background run's task created from it) is its child, and upstream calls carry the same trace id.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import tracing
from ..config import Settings
from .access_log import _route_of


def install_tracing(app: FastAPI, settings: Settings) -> None:
    """Configure tracing from settings and the OTEL_* variables; add the middleware (outermost) only when on."""
    tracing.configure(settings.tracing)
    if tracing.TRACER is not None:
        app.add_middleware(TracingMiddleware)


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or tracing.TRACER is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, trace

        method = scope["method"]
        span = tracing.TRACER.start_span(
            method,
            context=tracing.extract(scope["headers"]),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"], "url.scheme": scope["scheme"]},
        )
        status = {"code": 0}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        token = context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            context.detach(token)
            route = _route_of(scope)
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            code = status["code"] or 500
            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                tracing.fail(span, str(code))
            span.end()
