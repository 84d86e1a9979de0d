"""`POST /v1/messages`: a synchronous run, streamed as SSE or folded into one JSON message.

A client that disconnects cancels the run and closes the upstream request. A run that
fails before its first output is answered as an HTTP error (502/503/504), not a stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import metrics
from ..api_models import MessageResponse
from ..config import Settings
from ..engine import Run
from ..errors import RunFailed
from ..events import Event, new_message_id
from ..folding import MessageFolder
from ..statuses import FinishReason
from .chat_body import read_chat_request
from .openapi import ERROR_RESPONSES, chat_body_doc
from .sse import ClientGone, EventStreamResponse, cancel_on_disconnect
from .state import principal_of, services, tenant_of

log = logging.getLogger("backstream.app")

router = APIRouter()


@router.post(
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
        **ERROR_RESPONSES,
    },
    openapi_extra=chat_body_doc(),
)
async def create_message(request: Request) -> Response:
    """Run a chat request; `stream: true` answers with SSE events, otherwise one JSON message."""
    s = services(request)
    quotas = s.deployment.quotas
    chat = await read_chat_request(request, s.settings)
    run = Run(new_message_id(), chat, s.models, s.models.resolve(chat.model), s.options)
    principal, tenant = principal_of(request), tenant_of(request)
    await quotas.acquire(principal.name, tenant, run.message_id, queued=False)
    metrics.RUNS_STARTED.labels("sync", run.config.name).inc()
    started = time.monotonic()

    async def release() -> None:
        await quotas.release(principal.name, tenant, run.message_id)
        metrics.record_run(
            "sync", run.served_by.name, run.finish_reason or "Cancelled", run.seq, run.usage, time.monotonic() - started
        )

    if chat.stream:
        return await _stream_sync(request, run, s.settings, release)
    try:
        return await _fold_sync(request, run)
    finally:
        await release()


async def _first_events(run: Run, events: AsyncGenerator[Event, None]) -> list[Event]:
    """Read up to the first event after stream_start: enough to know whether the upstream answered."""
    head = []
    async for event in events:
        head.append(event)
        if event.type != "stream_start":
            break
    return head


def _failed_before_output(head: list[Event]) -> RunFailed | None:
    """The run ended with an error before any output: answered as an HTTP error, not a stream."""
    last = head[-1] if head else None
    if last is None or last.type != "stream_end" or last.load()["finish_reason"] != FinishReason.ERROR:
        return None
    err = last.load()["error"]
    return RunFailed(err["type"], err["message"])


async def _stream_sync(
    request: Request, run: Run, settings: Settings, release: Callable[[], Awaitable[None]]
) -> Response:
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
        events,
        keepalive_s=settings.keepalive_s,
        on_close=on_close,
        head=b"".join(e.frame() for e in head),
        encode=Event.frame,
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
