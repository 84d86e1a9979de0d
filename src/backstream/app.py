"""The HTTP application: routes, the shared error shape, request ids and body limits."""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from . import __version__, metrics
from .auth import Authenticator
from .config import Settings
from .egress import EgressDenied, check_url
from .http_guards import SECURITY_HEADERS, SecurityHeaders, add_cors
from .limits import Quotas, build_quotas
from .engine import MessageFolder, Run, RunOptions
from .errors import STATUS_BY_TYPE, ApiError, error_body, invalid, pydantic_details
from .events import Event, new_message_id, new_ulid
from .models import ModelTable
from .scheduler import RunScheduler
from .store import create_store
from .store_outage import StoreOutageGuard
from .streams import build_router, principal_of, tenant_of
from .responses import ClientGone, EventStreamResponse, cancel_on_disconnect
from .schema import ChatRequest, ErrorResponse, McpServer, MessageResponse, ModelInfo, ModelList
from .json_schemas import check_json_depth, check_request_schema

log = logging.getLogger("backstream.app")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch only: `$` accepts a trailing newline


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _request_id(scope: dict[str, Any]) -> str:
    return scope.get("state", {}).get("request_id") or "req_" + new_ulid()


def error_response(scope: dict[str, Any], status: int, type: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> Response:
    request_id = _request_id(scope)
    # Set here too: a 500 is answered outside the middleware that adds it to everything else.
    return Response(
        error_body(type, message, request_id, details),
        status_code=status,
        media_type="application/json",
        headers={**SECURITY_HEADERS, **(headers or {}), "x-request-id": request_id},
    )


class RequestContext:
    """Pure ASGI middleware, before any work: request id, authentication, tenant, rate limits, body size limit."""

    def __init__(self, app: Any, max_body_bytes: int, authenticator: Authenticator, quotas: Quotas) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.authenticator = authenticator
        self.quotas = quotas

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else "req_" + new_ulid()
        scope.setdefault("state", {})["request_id"] = request_id
        rid_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                message["headers"] = headers
            await send(message)

        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1/"):
            try:
                principal = await self.authenticator.authenticate(_header(headers, b"authorization"))
                tenant = self.authenticator.tenant_for(principal, _header(headers, b"x-tenant"))
                await self.quotas.hit(principal, tenant)
            except ApiError as exc:
                response = error_response(scope, exc.status, exc.type, exc.message, exc.details, exc.headers)
                await response(scope, receive, send_with_id)
                return
            scope["state"]["principal"] = principal
            scope["state"]["tenant"] = tenant
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._too_large(scope, send_with_id)
            return
        seen = 0

        async def receive_limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise ApiError(413, "request_too_large", f"request body exceeds {self.max_body_bytes} bytes")
            return message

        await self.app(scope, receive_limited, send_with_id)

    async def _too_large(self, scope: dict[str, Any], send: Any) -> None:
        response = error_response(scope, 413, "request_too_large", f"request body exceeds {self.max_body_bytes} bytes")
        await response(scope, None, send)  # type: ignore[arg-type]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        413: "Body too large",
        422: "Invalid request (field-level details)",
        502: "Upstream provider failed",
        503: "Upstream overloaded",
        504: "Upstream timed out",
    }.items()
}

_REQUEST_EXAMPLE = {
    "model": "local",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Write a haiku about rivers."}],
    "stream": True,
}


def create_app(settings: Settings) -> FastAPI:
    models = ModelTable(settings)
    store = create_store(settings)
    quotas = build_quotas(settings, getattr(store, "redis", None))
    scheduler = RunScheduler(settings, store, models, quotas)
    authenticator = Authenticator(settings.auth)
    options = RunOptions.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        await scheduler.start()
        # Everything imported so far lives as long as the process: keep the collector off it,
        # and collect young objects less often (each token allocates a few).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        try:
            yield
        finally:
            await scheduler.stop()
            await store.close()
            await models.aclose()

    app = FastAPI(
        title="Backstream",
        version=__version__,
        description="Self-hosted LLM chat gateway with durable background chat streams.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
    )
    app.state.settings = settings
    app.state.models = models
    app.state.store = store
    app.state.scheduler = scheduler
    app.state.quotas = quotas
    app.add_middleware(RequestContext, max_body_bytes=settings.limits.max_body_bytes, authenticator=authenticator, quotas=quotas)
    app.add_middleware(StoreOutageGuard, store=store, error_response=error_response)  # outside auth and rate limits, which read the store
    app.add_middleware(SecurityHeaders)  # response headers and CORS wrap everything, preflights bypass auth
    add_cors(app, settings.cors)
    _install_error_handlers(app)
    _install_openapi(app)

    @app.get("/healthz", tags=["operations"], responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Response:
        """Readiness: the store and every configured provider are usable."""
        problems = {f"models.{name}": reason for name, reason in (await models.check()).items()}
        store_problem = await store.ping()
        if store_problem:
            problems["store"] = store_problem
        if problems:
            # Unauthenticated: name the component, keep addresses and error texts in the log.
            for field, reason in problems.items():
                log.warning("not ready: %s: %s", field, reason)
            details = [{"field": field, "message": "not ready", "type": "not_ready"} for field in problems]
            return error_response(request.scope, 503, "overloaded_error", "not ready", details)
        return ORJSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], response_class=Response, responses={200: {"content": {"text/plain": {"example": "backstream_runs_started_total{kind=\"sync\",model=\"local\"} 3.0"}}}})
    async def metrics_endpoint() -> Response:
        """Prometheus metrics: runs, events, tokens, queue."""
        metrics.ACTIVE_RUNS.set(scheduler.active)
        metrics.PENDING_RUNS.set(scheduler.local_pending)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    async def list_models() -> ModelList:
        """The model names and aliases this server routes."""
        return ModelList(
            data=[
                ModelInfo(
                    id=m.name,
                    provider=m.provider,
                    aliases=m.aliases,
                    default=m.name == models.resolve(None).name,
                    max_concurrency=m.max_concurrency,
                )
                for m in models.models.values()
            ]
        )

    @app.post(
        "/v1/messages",
        tags=["messages"],
        response_model=MessageResponse,
        responses={
            200: {
                "description": "The folded message, or with `stream: true` an SSE stream of events",
                "content": {
                    "text/event-stream": {
                        "example": 'id: 1\nevent: stream_start\ndata: {"id":"evt_01K...","timestamp":1776855811,"message_id":"msg_01K...","model":"local","provider":"local","metadata":{"warnings":[]}}\n\n'
                    }
                },
            },
            **_ERROR_RESPONSES,
        },
        openapi_extra=_chat_body_doc(),
    )
    async def create_message(request: Request) -> Response:
        """Run a chat request; `stream: true` answers with SSE events, otherwise one JSON message."""
        chat = await read_chat_request(request, settings)
        run = Run(new_message_id(), chat, models, models.resolve(chat.model), options)
        principal, tenant = principal_of(request), tenant_of(request)
        await quotas.acquire(principal.name, tenant, run.message_id, queued=False)
        metrics.RUNS_STARTED.labels("sync", run.config.name).inc()
        started = time.monotonic()

        async def release() -> None:
            await quotas.release(principal.name, tenant, run.message_id)
            metrics.record_run("sync", run.served_by.name, run.finish_reason or "Cancelled", run.seq, run.usage, time.monotonic() - started)

        if chat.stream:
            return await _stream_sync(request, run, settings, release)
        try:
            return await _fold_sync(request, run)
        finally:
            await release()

    app.include_router(build_router(read_chat_request))
    return app


async def read_chat_request(request: Request, settings: Settings) -> ChatRequest:
    """Parse and validate a chat body; every problem is a 422 naming its field."""
    raw = await request.body()
    if not raw.strip():
        raise invalid("a JSON request body is required", "body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise invalid("request body must be a JSON object", "body")
    check_json_depth(data, settings.limits.max_json_depth, raw)  # before anything recursive walks it
    try:
        chat = ChatRequest.model_validate(data)
    except ValidationError as exc:
        details = pydantic_details(exc.errors(include_url=False))
        first = details[0]
        raise ApiError(422, "invalid_request_error", f"invalid request: {first['field']}: {first['message']}", details) from None
    limits = settings.limits
    if len(chat.messages) > limits.max_messages:
        raise invalid(f"at most {limits.max_messages} messages are allowed", "messages")
    if chat.tools and len(chat.tools) > limits.max_tools:
        raise invalid(f"at most {limits.max_tools} tools are allowed", "tools")
    for i, tool in enumerate(chat.tools or ()):
        if len(orjson.dumps(tool.input_schema)) > limits.max_schema_bytes:
            raise invalid(f"input_schema exceeds {limits.max_schema_bytes} bytes of JSON", f"tools.{i}.input_schema")
        check_request_schema(tool.input_schema, f"tools.{i}.input_schema")
    if chat.output_format is not None:
        field = _output_schema_field(data)
        if len(orjson.dumps(chat.output_format.schema_)) > limits.max_schema_bytes:
            raise invalid(f"the output schema exceeds {limits.max_schema_bytes} bytes of JSON", field)
        check_request_schema(chat.output_format.schema_, field)
    if chat.mcp_servers:
        chat.mcp_servers = [await _resolve_mcp_server(i, s, settings) for i, s in enumerate(chat.mcp_servers)]
    if len(raw) > limits.max_text_chars and sum(_text_chars(m.content) for m in chat.messages) > limits.max_text_chars:
        raise invalid(f"message content exceeds {limits.max_text_chars} characters", "messages")
    return chat


def _output_schema_field(data: dict[str, Any]) -> str:
    """Where the request put its output schema: output_config, or the deprecated response_format."""
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_schema", "json_object"):
        return "response_format.schema" if response_format.get("schema") is not None else "response_format.json_schema.schema"
    return "output_config.format.schema"


async def _resolve_mcp_server(i: int, server: McpServer, settings: Settings) -> McpServer:
    """A request's MCP server: its own URL (checked against the egress rules) or a configured one by name."""
    if server.url is None:
        configured = next((c for c in settings.mcp_servers if c.name == server.name), None)
        if configured is None:
            known = ", ".join(c.name for c in settings.mcp_servers) or "none"
            raise invalid(f"mcp_servers.{i} has no url and no configured MCP server is named {server.name!r} (configured: {known})", f"mcp_servers.{i}.url")
        tools = server.tool_configuration
        if configured.allowed_tools is not None:
            allowed = [t for t in (tools.allowed_tools or configured.allowed_tools) if t in configured.allowed_tools]
            tools = tools.model_copy(update={"allowed_tools": allowed})
        # It stays a name: the run looks up its URL and token (tools.ToolBox), so the stored request holds no
        # operator secret. Configured servers are the operator's choice, so they skip the egress rules.
        return server.model_copy(update={"tool_configuration": tools})
    try:
        await check_url(server.url, settings.egress)  # before anything connects to it
    except EgressDenied as exc:
        raise invalid(f"MCP server {server.name!r} is not allowed: {exc}", f"mcp_servers.{i}.url") from None
    return server


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(getattr(b, "text", "") or "") for b in content)


async def _first_events(run: Run, events: AsyncIterator[Event]) -> list[Event]:
    """Read up to the first event after stream_start: enough to know whether the upstream answered."""
    head = []
    async for event in events:
        head.append(event)
        if event.type != "stream_start":
            break
    return head


def _failed_before_output(head: list[Event]) -> ApiError | None:
    last = head[-1] if head else None
    if last is None or last.type != "stream_end" or last.load()["finish_reason"] != "Error":
        return None
    err = last.load()["error"]
    status = STATUS_BY_TYPE.get(err["type"], 502)
    return ApiError(status if status >= 500 else 502, err["type"], err["message"])


async def _stream_sync(request: Request, run: Run, settings: Settings, release: Any) -> Response:
    events = run.events()
    try:
        head = await cancel_on_disconnect(request.receive, _first_events(run, events))
    except ClientGone:
        await events.aclose()
        await release()
        return Response(status_code=499)
    failure = _failed_before_output(head)
    if failure is not None:
        await events.aclose()
        await release()
        raise failure

    async def on_close() -> None:
        await events.aclose()
        await release()
        if not run.ended:
            log.info("run %s cancelled: client disconnected", run.message_id)

    return EventStreamResponse(
        events, keepalive_s=settings.keepalive_s, on_close=on_close, head=b"".join(e.frame() for e in head), encode=Event.frame
    )


async def _fold_sync(request: Request, run: Run) -> Response:
    folder = MessageFolder()

    async def fold() -> list[Event]:
        head = await _first_events(run, events)
        for event in head:
            folder.feed(event)
        if _failed_before_output(head) is None:
            async for event in events:
                folder.feed(event)
        return head

    events = run.events()
    try:
        head = await cancel_on_disconnect(request.receive, fold())
    except ClientGone:
        return Response(status_code=499)
    finally:
        await events.aclose()
    failure = _failed_before_output(head)
    if failure is not None:
        raise failure
    return Response(orjson.dumps(folder.message(run.message_id)), media_type="application/json")


def _chat_body_doc() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatRequest"},
                    "example": _REQUEST_EXAMPLE,
                }
            },
        }
    }


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        chat_schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(chat_schema.pop("$defs", {}))
        schemas["ChatRequest"] = chat_schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(request.scope, exc.status, exc.type, exc.message, exc.details, exc.headers)

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
