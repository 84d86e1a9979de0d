"""The edge's half of errors: domain errors become an HTTP status, headers and the shared error shape.

Every failing response is `{"error": {"type", "message", "details"?}, "request_id"}`
with `X-Request-Id` (and `Retry-After` when retrying helps).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import GatewayError, RateLimited, RunFailed, Unauthenticated, Unavailable, pydantic_details
from ..events import new_ulid
from .dialects import error_body_for
from .security_headers import SECURITY_HEADERS

log = logging.getLogger("backstream.app")

# error type -> HTTP status; a run's own error types (upstream_error, …) are mapped the same way.
STATUS_BY_TYPE = {
    "invalid_request_error": 422,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "upstream_error": 502,
    "overloaded_error": 503,
    "model_unavailable": 503,
    "timeout_error": 504,
    "api_error": 500,
}


def error_body(type: str, message: str, request_id: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {"type": type, "message": message}
    if details:
        error["details"] = details
    return orjson.dumps({"error": error, "request_id": request_id})


def request_id_of(scope: Scope) -> str:
    return scope.get("state", {}).get("request_id") or "req_" + new_ulid()


def error_response(
    scope: Scope, status: int, type: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> Response:
    request_id = request_id_of(scope)
    body = error_body_for(scope) or error_body  # the shape the client's dialect parses
    # Set here too: a 500 is answered outside the middleware that adds it to everything else.
    return Response(
        body(type, message, request_id, details),
        status_code=status,
        media_type="application/json",
        headers={**SECURITY_HEADERS, **(headers or {}), "x-request-id": request_id},
    )


def status_of(exc: GatewayError) -> int:
    if isinstance(exc, RunFailed):  # a run that failed before its output: always a gateway-side status
        status = STATUS_BY_TYPE.get(exc.type, 502)
        return status if status >= 500 else 502
    return STATUS_BY_TYPE.get(exc.type, 500)


def headers_of(exc: GatewayError) -> dict[str, str]:
    if isinstance(exc, RateLimited):
        return {"retry-after": str(exc.retry_after_s)}
    if isinstance(exc, Unavailable) and exc.retry_after_s is not None:
        return {"retry-after": str(exc.retry_after_s)}
    if isinstance(exc, Unauthenticated):
        challenge = 'Bearer realm="backstream"' + (f', error="{exc.challenge}"' if exc.challenge else "")
        return {"www-authenticate": challenge}
    return {}


def response_for(scope: Scope, exc: GatewayError) -> Response:
    return error_response(scope, status_of(exc), exc.type, exc.message, exc.details, headers_of(exc))


async def answer(scope: Scope, receive: Receive, send: Send, exc: GatewayError) -> None:
    """Answer a request from inside a middleware (before the application saw it)."""
    await response_for(scope, exc)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, exc: GatewayError) -> Response:
        return response_for(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        details = pydantic_details(list(exc.errors()))
        return error_response(request.scope, 422, "invalid_request_error", "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(request.scope, exc.status_code, type_, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.scope, 500, "api_error", "internal server error")
