"""A synchronous run answered on the request's own connection, in whichever wire format the surface speaks.

A client that disconnects cancels the run and closes the upstream request. A run that
fails before its first output is answered as an HTTP error (502/503/504), not a stream.
The surfaces (`messages.py`, `chat_completions.py`, `responses.py`) differ only in their
`Answer`: how events become SSE bytes, and how the folded message becomes their JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .. import metrics
from ..api_models import ChatRequest
from ..config import Settings
from ..engine import Run
from ..errors import RunFailed
from ..events import Event
from ..folding import MessageFolder
from ..statuses import FinishReason
from .sse import ClientGone, EventStreamResponse, cancel_on_disconnect
from .state import principal_of, services, tenant_of

log = logging.getLogger("backstream.app")


@dataclass(frozen=True)
class Answer:
    """How one surface answers: a fresh SSE encoder per stream, and the folded message as its JSON."""

    encoder: Callable[[], Callable[[Event], bytes]] = lambda: Event.frame
    fold: Callable[[dict[str, Any]], Any] = lambda message: message
    # Foreign clients have no place for an error inside a finished message: a run that failed
    # after its first output is answered as an HTTP error too.
    error_after_output: bool = False


NATIVE = Answer()


async def run_sync(request: Request, chat: ChatRequest, message_id: str, answer: Answer = NATIVE) -> Response:
    """Run `chat` on this connection: streamed when it asks for it, otherwise folded into one JSON."""
    s = services(request)
    quotas = s.deployment.quotas
    principal, tenant = principal_of(request), tenant_of(request)
    run = Run(message_id, chat, s.models, s.models.resolve(chat.model), s.options, tenant=tenant)
    await quotas.acquire(principal.name, tenant, run.message_id, queued=False)
    metrics.run_started("sync", run.config.name, tenant)
    metrics.SYNC_RUNS_ACTIVE.inc()
    started = time.monotonic()

    async def release() -> None:
        await quotas.release(principal.name, tenant, run.message_id)
        metrics.SYNC_RUNS_ACTIVE.dec()
        metrics.record_run("sync", run, time.monotonic() - started, tenant, finish="Cancelled")

    if chat.stream:
        return await _stream_sync(request, run, s.settings, release, answer.encoder())
    try:
        return await _fold_sync(request, run, answer)
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
    request: Request,
    run: Run,
    settings: Settings,
    release: Callable[[], Awaitable[None]],
    encode: Callable[[Event], bytes],
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
        head=b"".join(encode(e) for e in head),
        encode=encode,
    )


async def _fold_sync(request: Request, run: Run, answer: Answer) -> Response:
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
    if failure is None and answer.error_after_output and folder.error:
        failure = RunFailed(folder.error["type"], folder.error["message"])
    if failure is not None:
        raise failure
    return Response(orjson.dumps(answer.fold(folder.message(run.message_id))), media_type="application/json")
