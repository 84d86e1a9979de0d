"""Background-run endpoints: start, watch (replay, then live), status, cancel, delete."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from .auth import ANONYMOUS, ANONYMOUS_TENANT, Principal
from .errors import ApiError, invalid, not_found
from .events import new_message_id
from .responses import EventStreamResponse
from .schema import ErrorResponse
from .store import RunRecord

MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # use with fullmatch: `$` would let a trailing newline in
MAX_CURSOR = 2**53 - 1  # beyond any real event position; larger numbers would overflow the stores' integers
READ_BATCH = 512
WAIT_S = 5.0  # how long a watcher waits before re-checking that its run still exists
OUTAGE_MAX_S = 30.0  # a watcher waits this long for an unreachable store before giving up


class AsyncStarted(BaseModel):
    message_id: str
    status: str = "pending"
    message: str = "Request initiated successfully"


class StreamMetadata(BaseModel, extra="allow"):
    model: str | None = None
    provider: str | None = None
    priority: int = 0
    correlation_id: str | None = None
    event_count: int = 0
    usage: dict[str, Any] | None = None


class StreamStatus(BaseModel):
    message_id: str
    status: str
    created_at: str
    updated_at: str
    completed_at: str | None
    error_message: str | None
    stream_type: str = "chat_completion"
    metadata: StreamMetadata


class Cancelled(BaseModel):
    message: str = "Stream cancelled successfully"
    message_id: str


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


def tenant_of(request: Request) -> str:
    return getattr(request.state, "tenant", None) or ANONYMOUS_TENANT


def principal_of(request: Request) -> Principal:
    return getattr(request.state, "principal", None) or ANONYMOUS


def _lookup_id(message_id: str) -> str:
    if not MESSAGE_ID.fullmatch(message_id):
        raise not_found()  # an id that cannot exist is answered like any unknown id
    return message_id


def _cursor(request: Request, after: int | None) -> int:
    header = request.headers.get("last-event-id")
    if header is not None and header.strip():
        value = header.strip()
        # isdecimal() alone accepts non-ASCII digits, which int() may then refuse
        if not (value.isascii() and value.isdecimal()) or len(value) > 16 or int(value) > MAX_CURSOR:
            raise invalid(f"Last-Event-ID must be an event position, 0 to {MAX_CURSOR}", "Last-Event-ID")
        return int(value)
    return after or 0


_NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown message_id (or another tenant's)"}}
_EXAMPLE_ID = "msg_async_12345"


def build_router(read_chat_request: Any) -> APIRouter:
    router = APIRouter(prefix="/v1/messages/async", tags=["async messages"])

    @router.post(
        "",
        response_model=AsyncStarted,
        responses={
            200: {"content": {"application/json": {"example": {"message_id": _EXAMPLE_ID, "status": "pending", "message": "Request initiated successfully"}}}},
            409: {"model": ErrorResponse, "description": "message_id already exists"},
            413: {"model": ErrorResponse, "description": "Body too large"},
            422: {"model": ErrorResponse, "description": "Invalid request"},
            429: {"model": ErrorResponse, "description": "Run queue full"},
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}, "example": {"max_tokens": 64, "messages": [{"role": "user", "content": "Summarise the plot of Hamlet."}]}}}}},
    )
    async def start(
        request: Request,
        message_id: str | None = Query(None, description="Optional custom id, [A-Za-z0-9_-]{1,128}; generated when absent", examples=[_EXAMPLE_ID]),
    ) -> Any:
        """Start a background run and return its id at once; the run goes on whether or not anybody watches."""
        if message_id is not None and not MESSAGE_ID.fullmatch(message_id):
            raise invalid("message_id must be 1-128 characters of letters, digits, '_' and '-'", "message_id")
        app = request.app
        chat = await read_chat_request(request, app.state.settings)
        config = app.state.models.resolve(chat.model)
        raw = chat.model_dump_json(exclude_none=True, by_alias=True, exclude={"response_format"}).encode()
        record = await app.state.scheduler.submit(tenant_of(request), principal_of(request).name, message_id or new_message_id(), chat, config, raw)
        return {"message_id": record.message_id, "status": "pending", "message": "Request initiated successfully"}

    @router.get(
        "/{message_id}/stream",
        responses={
            200: {
                "description": "SSE: replay of everything so far (or after the cursor), then live events; closes after stream_end",
                "content": {"text/event-stream": {"example": 'id: 1\nevent: stream_start\ndata: {"id":"evt_01K...","timestamp":1776855811,"message_id":"msg_async_12345","model":"local","provider":"local","metadata":{"warnings":[]}}\n\n'}},
            },
            **_NOT_FOUND,
            422: {"model": ErrorResponse, "description": "Bad cursor"},
        },
    )
    async def watch(
        request: Request,
        message_id: str,
        after: int | None = Query(None, ge=0, le=MAX_CURSOR, description="Send only events with position > after (like Last-Event-ID)"),
    ) -> Response:
        """Watch a run: every event after the cursor in order, then live ones, then the connection closes."""
        tenant = tenant_of(request)
        store = request.app.state.store
        if await store.get_run(tenant, _lookup_id(message_id)) is None:
            raise not_found()
        cursor = _cursor(request, after)
        return EventStreamResponse(_frames(store, tenant, message_id, cursor), keepalive_s=request.app.state.settings.keepalive_s)

    @router.get("/{message_id}/status", response_model=StreamStatus, responses=_NOT_FOUND)
    async def status(request: Request, message_id: str) -> Any:
        """State and metadata of a run, without consuming its stream."""
        tenant = tenant_of(request)
        store = request.app.state.store
        record = await store.get_run(tenant, _lookup_id(message_id))
        if record is None:
            raise not_found()
        count = record.event_count if record.terminal else await store.last_seq(tenant, message_id)
        return status_body(record, count)

    @router.post(
        "/{message_id}/cancel",
        response_model=Cancelled,
        responses={**_NOT_FOUND, 409: {"model": ErrorResponse, "description": "The run already completed or failed"}},
    )
    async def cancel(request: Request, message_id: str) -> Any:
        """Stop a pending or running run: the upstream request is closed and the stream ends with Cancelled."""
        await request.app.state.scheduler.cancel(tenant_of(request), _lookup_id(message_id))
        return {"message": "Stream cancelled successfully", "message_id": message_id}

    async def _delete(request: Request, message_id: str) -> Response:
        await request.app.state.scheduler.delete(tenant_of(request), _lookup_id(message_id))
        return Response(status_code=204)

    router.add_api_route(
        "/{message_id}", _delete, methods=["DELETE"], status_code=204, responses=_NOT_FOUND, summary="Delete a run",
        description="Cancel the run if it is active, then remove its status and events.", response_class=Response,
    )
    router.add_api_route(
        "/{message_id}/delete", _delete, methods=["DELETE"], status_code=204, responses=_NOT_FOUND, summary="Delete a run (alias)",
        description="Same as DELETE /v1/messages/async/{message_id}.", response_class=Response,
    )
    return router


async def _frames(store: Any, tenant: str, message_id: str, cursor: int) -> AsyncIterator[bytes]:
    """Replay then follow a run; the frames of one read go out in one write.

    Invariant: the stream closes cleanly only after the run's stream_end, after a delete,
    or at shutdown while the run goes on (elsewhere or after the restart), so a client
    that got no stream_end knows to resume. The run record is only consulted when a read
    comes back empty for a reason other than "caught up with a live run": the first time,
    after a wake-up that brought nothing (deletion, takeover), and after a quiet WAIT_S.
    """
    outage = _Outage(store)
    check = True
    while True:
        try:
            batch = await store.read(tenant, message_id, cursor, READ_BATCH)
            if not batch:
                if store.closing:
                    return
                if check:
                    ended, rest = await _ended(store, tenant, message_id, cursor)
                    if ended:
                        if rest:
                            yield rest
                        return
                await store.wait(tenant, message_id, cursor, WAIT_S)
                check = True  # a read right after a real wake-up has events, which clears this again
                continue
        except Exception as exc:
            await outage.pause(exc)
            continue
        outage.over()
        cursor = batch[-1].seq
        yield b"".join(e.frame_bytes() for e in batch)
        if batch[-1].type == "stream_end":
            return
        check = False


async def _ended(store: Any, tenant: str, message_id: str, cursor: int) -> tuple[bool, bytes]:
    """Whether the watch is over (run deleted or terminal), and the frames left to send if so."""
    record = await store.get_run(tenant, message_id)
    if record is None:
        return True, b""
    if not record.terminal:
        return False, b""
    # The status is written only after stream_end is durable. Read the rest from the store itself:
    # this process's copy of the log may stop where another replica took the run over.
    frames = []
    while True:
        batch = await store.read_stored(tenant, message_id, cursor, READ_BATCH)
        if not batch:
            return True, b"".join(frames)
        cursor = batch[-1].seq
        frames.extend(e.frame_bytes() for e in batch)


class _Outage:
    """A watcher rides out a store outage (a Redis restart) with backoff; keep-alives go on meanwhile."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.since: float | None = None
        self.pause_s = 0.05

    async def pause(self, exc: Exception) -> None:
        now = time.monotonic()
        if not self.store.unavailable(exc):
            raise exc
        self.since = self.since or now
        if now - self.since > OUTAGE_MAX_S:
            raise exc
        await asyncio.sleep(self.pause_s)
        self.pause_s = min(1.0, self.pause_s * 2)

    def over(self) -> None:
        self.since = None
        self.pause_s = 0.05


__all__ = ["ApiError", "build_router", "status_body"]
