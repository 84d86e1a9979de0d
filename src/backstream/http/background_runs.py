"""Background runs over HTTP: start, watch (replay, then live), status, cancel, delete."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from ..api_models import AsyncStarted, Cancelled, ErrorResponse, RunList, RunResult, StreamStatus
from ..background.watch import follow_run
from ..dialects import anthropic
from ..errors import Invalid, NotFound
from ..events import Event, new_message_id
from ..results import fold_result
from ..statuses import RunStatus
from ..store import RunQuery, RunRecord, StreamStore
from .chat_body import read_chat_request
from .dialects import translated, wants_anthropic
from .sse import EventStreamResponse
from .state import principal_of, services, tenant_of

MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # use with fullmatch: `$` would let a trailing newline in
MAX_CURSOR = 2**53 - 1  # beyond any real event position; larger numbers would overflow the stores' integers


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_body(record: RunRecord, event_count: int) -> dict[str, Any]:
    return {
        "message_id": record.message_id,
        "status": record.status,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "completed_at": _iso(record.completed_at),
        "error_message": record.error_message,
        "stream_type": "chat_completion",
        "metadata": {**record.metadata, "event_count": event_count},
    }


def _lookup_id(message_id: str) -> str:
    if not MESSAGE_ID.fullmatch(message_id):
        raise NotFound()  # an id that cannot exist is answered like any unknown id
    return message_id


def _cursor(request: Request, after: int | None) -> int:
    header = request.headers.get("last-event-id")
    if header is not None and header.strip():
        value = header.strip()
        # isdecimal() alone accepts non-ASCII digits, which int() may then refuse
        if not (value.isascii() and value.isdecimal()) or len(value) > 16 or int(value) > MAX_CURSOR:
            raise Invalid(f"Last-Event-ID must be an event position, 0 to {MAX_CURSOR}", "Last-Event-ID")
        return int(value)
    return after or 0


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown message_id (or another tenant's)"}
}
_EXAMPLE_ID = "msg_async_12345"


router = APIRouter(prefix="/v1/messages/async", tags=["async messages"])


@router.post(
    "",
    response_model=AsyncStarted,
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "message_id": _EXAMPLE_ID,
                        "status": "pending",
                        "message": "Request initiated successfully",
                    }
                }
            }
        },
        409: {"model": ErrorResponse, "description": "message_id already exists"},
        413: {"model": ErrorResponse, "description": "Body too large"},
        422: {"model": ErrorResponse, "description": "Invalid request"},
        429: {"model": ErrorResponse, "description": "Run queue full"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatRequest"},
                    "example": {
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": "Summarise the plot of Hamlet."}],
                    },
                }
            },
        }
    },
)
async def start(
    request: Request,
    message_id: str | None = Query(
        None, description="Optional custom id, [A-Za-z0-9_-]{1,128}; generated when absent", examples=[_EXAMPLE_ID]
    ),
) -> Any:
    """Start a background run and return its id at once; the run goes on whether or not anybody watches."""
    if message_id is not None and not MESSAGE_ID.fullmatch(message_id):
        raise Invalid("message_id must be 1-128 characters of letters, digits, '_' and '-'", "message_id")
    s = services(request)
    translate = translated(anthropic.parse_request) if wants_anthropic(request.scope) else None
    chat = await read_chat_request(request, s.settings, translate)
    config = s.models.resolve(chat.model)
    raw = chat.model_dump_json(exclude_none=True, by_alias=True, exclude={"response_format"}).encode()
    record = await s.deployment.runs.submit(
        tenant_of(request), principal_of(request).name, message_id or new_message_id(), chat, config, raw
    )
    return {"message_id": record.message_id, "status": "pending", "message": "Request initiated successfully"}


def encode_cursor(record: RunRecord) -> str:
    """Opaque keyset cursor: base64url of [created_at, message_id] of the last run of a page."""
    return base64.urlsafe_b64encode(orjson.dumps([record.created_at, record.message_id])).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, message_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise Invalid("cursor is not a cursor this server returned", "cursor") from None
    if (
        not isinstance(created_at, (int, float))
        or not isinstance(message_id, str)
        or not MESSAGE_ID.fullmatch(message_id)
    ):
        raise Invalid("cursor is not a cursor this server returned", "cursor")
    return float(created_at), message_id


def parse_time(value: str | None, name: str) -> float | None:
    """ISO 8601 (e.g. 2026-11-30T16:00:00Z; without an offset: UTC) -> unix seconds."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
        return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise Invalid(f"{name} must be an ISO 8601 date-time, e.g. 2026-11-30T16:00:00Z", name) from None


def _run_query(request: Request, params: dict[str, Any]) -> RunQuery:
    status, model, limit = params["status"], params["model"], params["limit"]
    if status is not None and status not in RunStatus.__members__.values():
        raise Invalid(f"status must be one of: {', '.join(RunStatus)}", "status")
    if model is not None:
        model = services(request).models.lookup(model).name  # an alias lists its model's runs
    if not (limit.isascii() and limit.isdecimal()) or not 1 <= int(limit) <= 100:
        raise Invalid("limit must be an integer from 1 to 100", "limit")
    cursor = params["cursor"]
    return RunQuery(
        status=status,
        model=model,
        created_after=parse_time(params["created_after"], "created_after"),
        created_before=parse_time(params["created_before"], "created_before"),
        before=None if cursor is None else decode_cursor(cursor),
        limit=int(limit),
    )


async def _status_of(store: StreamStore, record: RunRecord) -> dict[str, Any]:
    count = record.event_count if record.terminal else await store.last_seq(record.tenant, record.message_id)
    return status_body(record, count)


@router.get(
    "", response_model=RunList, responses={422: {"model": ErrorResponse, "description": "Bad filter or cursor"}}
)
async def list_runs(
    request: Request,
    status: str | None = Query(None, description="Only runs in this status (pending, processing, completed, …)"),
    model: str | None = Query(None, description="Only runs of this configured model (name or alias)"),
    created_after: str | None = Query(None, description="ISO 8601; runs created at or after it"),
    created_before: str | None = Query(None, description="ISO 8601; runs created before it"),
    limit: str = Query("20", description="Runs per page, 1 to 100"),
    cursor: str | None = Query(None, description="`next_cursor` of the previous page"),
) -> Any:
    """This tenant's runs, newest first, one page at a time: each item is what `…/{message_id}/status` answers.

    Pages are keyset pages: runs started or deleted between two requests neither repeat nor skip older runs."""
    params = {"status": status, "model": model, "limit": limit, "cursor": cursor}
    query = _run_query(request, {**params, "created_after": created_after, "created_before": created_before})
    store = services(request).deployment.store
    # One more than the page: whether there is a next page, without a second query.
    records = await store.list_runs(tenant_of(request), replace(query, limit=query.limit + 1))
    page = records[: query.limit]
    data = [await _status_of(store, r) for r in page]
    return {"data": data, "next_cursor": encode_cursor(page[-1]) if len(records) > query.limit else None}


@router.get(
    "/{message_id}/stream",
    responses={
        200: {
            "description": "SSE: replay of everything so far (or after the cursor), then live events; closes after stream_end",
            "content": {
                "text/event-stream": {
                    "example": 'id: 1\nevent: stream_start\ndata: {"id":"evt_01K...","timestamp":1776855811,"message_id":"msg_async_12345","model":"local","provider":"local","metadata":{"warnings":[]}}\n\n'
                }
            },
        },
        **_NOT_FOUND,
        422: {"model": ErrorResponse, "description": "Bad cursor"},
    },
)
async def watch(
    request: Request,
    message_id: str,
    after: int | None = Query(
        None, ge=0, le=MAX_CURSOR, description="Send only events with position > after (like Last-Event-ID)"
    ),
) -> Response:
    """Watch a run: every event after the cursor in order, then live ones, then the connection closes."""
    tenant = tenant_of(request)
    s = services(request)
    store = s.deployment.store
    if await store.get_run(tenant, _lookup_id(message_id)) is None:
        raise NotFound()
    cursor = _cursor(request, after)
    if wants_anthropic(request.scope):
        frames = follow_run(store, tenant, message_id, 0, anthropic_encoder(cursor))
    else:
        frames = follow_run(store, tenant, message_id, cursor)
    return EventStreamResponse(frames, keepalive_s=s.settings.keepalive_s)


def anthropic_encoder(cursor: int) -> Callable[[Event], bytes]:
    """Anthropic's stream numbers content blocks from the start, so a resumed watch replays the
    log from the beginning through the renderer, sending only what comes after the cursor."""
    renderer = anthropic.StreamRenderer()
    return lambda event: renderer.feed(event, event.seq > cursor)


@router.get("/{message_id}/status", response_model=StreamStatus, responses=_NOT_FOUND)
async def status(request: Request, message_id: str) -> Any:
    """State and metadata of a run, without consuming its stream."""
    tenant = tenant_of(request)
    store = services(request).deployment.store
    record = await store.get_run(tenant, _lookup_id(message_id))
    if record is None:
        raise NotFound()
    return await _status_of(store, record)


@router.get("/{message_id}/result", response_model=RunResult, responses=_NOT_FOUND)
async def result(request: Request, message_id: str) -> Any:
    """The run folded into one message (as `POST /v1/messages` answers), plus `status`; so far, while it is active."""
    tenant = tenant_of(request)
    record = await services(request).deployment.store.get_run(tenant, _lookup_id(message_id))
    if record is None:
        raise NotFound()
    body = await fold_result(services(request).deployment.store, record)
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "/{message_id}/cancel",
    response_model=Cancelled,
    responses={**_NOT_FOUND, 409: {"model": ErrorResponse, "description": "The run already completed or failed"}},
)
async def cancel(request: Request, message_id: str) -> Any:
    """Stop a pending or running run: the upstream request is closed and the stream ends with Cancelled."""
    await services(request).deployment.runs.cancel(tenant_of(request), _lookup_id(message_id))
    return {"message": "Stream cancelled successfully", "message_id": message_id}


async def _delete(request: Request, message_id: str) -> Response:
    await services(request).deployment.runs.delete(tenant_of(request), _lookup_id(message_id))
    return Response(status_code=204)


router.add_api_route(
    "/{message_id}",
    _delete,
    methods=["DELETE"],
    status_code=204,
    responses=_NOT_FOUND,
    summary="Delete a run",
    description="Cancel the run if it is active, then remove its status and events.",
    response_class=Response,
)
router.add_api_route(
    "/{message_id}/delete",
    _delete,
    methods=["DELETE"],
    status_code=204,
    responses=_NOT_FOUND,
    summary="Delete a run (alias)",
    description="Same as DELETE /v1/messages/async/{message_id}.",
    response_class=Response,
)
