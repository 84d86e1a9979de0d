"""`/v1/responses`: OpenAI Responses, with background mode over Backstream's background runs.

A background response is a background run (same store, tenancy, limits, priority and
retention); its id works on `/v1/messages/async/{id}/…` too. A response without
`background` is a synchronous run (`sync_runs.py`): it is not stored, so it cannot be
retrieved later. Everything a response says about its request is rebuilt from the stored
native request; its stream is the run's log rendered by `dialects.openai_responses`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from ..api_models import ErrorResponse
from ..background.watch import follow_run
from ..dialects import openai_responses as dialect
from ..errors import NotFound
from ..events import new_ulid
from ..folding import MessageFolder
from ..store import RunRecord, StreamStore
from .background_runs import MAX_CURSOR, MESSAGE_ID
from .chat_body import read_chat_request
from .dialects import translated
from .openapi import ERROR_RESPONSES
from .sse import EventStreamResponse
from .state import principal_of, services, tenant_of
from .sync_runs import Answer, run_sync

router = APIRouter(prefix="/v1/responses", tags=["OpenAI dialect"])

READ_BATCH = 512
_EXAMPLE = {"model": "local", "input": "Tell me a story.", "background": True, "max_output_tokens": 200}
_EVENT = (
    "id: 5\nevent: response.output_text.delta\ndata: "
    '{"type":"response.output_text.delta","item_id":"msg_01K..._0","output_index":0,"content_index":0,'
    '"delta":"Once","logprobs":[],"sequence_number":5}\n\n'
)
_STREAM_DOC = {"content": {"text/event-stream": {"example": _EVENT}}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown response id (or another tenant's)"}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "The response already completed or failed"}
}


def _json(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


@router.post(
    "",
    responses={
        200: {"description": "A `response`, or with `stream: true` its events", **_STREAM_DOC},
        **ERROR_RESPONSES,
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"example": _EXAMPLE}}}},
)
async def create_response(request: Request) -> Response:
    """OpenAI Responses: `responses.create` of the `openai` SDK, including `background: true`."""
    s = services(request)
    params: list[dialect.ResponsesParams] = []

    def parse(body: dict[str, Any]) -> dict[str, Any]:
        params.append(dialect.parse_request(body))
        return {**params[0].native, "stream": params[0].stream and not params[0].background}

    chat = await read_chat_request(request, s.settings, translated(parse))
    config = s.models.resolve(chat.model)
    response_id = "resp_" + new_ulid()
    if not params[0].background:
        base = dialect.response_base(params[0].native, response_id, time.time(), config.name, False)
        answer = Answer(
            encoder=lambda: dialect.StreamRenderer(base, shared=False).feed,
            fold=lambda message: dialect.response_object(
                base, message, dialect.finished_status(message["finish_reason"])
            ),
        )
        return await run_sync(request, chat, response_id, answer)
    raw = chat.model_dump_json(exclude_none=True, by_alias=True, exclude={"response_format"}).encode()
    record = await s.deployment.runs.submit(
        tenant_of(request), principal_of(request).name, response_id, chat, config, raw
    )
    base = _base(record)
    if params[0].stream:
        return _watch(request, record, base, -1)
    return _json(dialect.response_object(base, None, "queued"))


@router.get(
    "/{response_id}",
    responses={
        200: {"description": "The response so far, or with `stream=true` its events", **_STREAM_DOC},
        **_NOT_FOUND,
        422: ERROR_RESPONSES[422],
    },
)
async def retrieve_response(
    request: Request,
    response_id: str,
    stream: bool = Query(False, description="Stream the events: replay, then live"),
    starting_after: int | None = Query(
        None, ge=-1, le=MAX_CURSOR, description="Send only events after this sequence_number"
    ),
) -> Response:
    """A background response: its status, output and usage so far; with `stream=true`, its events."""
    record = await _record(request, response_id)
    base = _base(record)
    if stream:
        return _watch(request, record, base, -1 if starting_after is None else starting_after)
    return _json(await _fold(services(request).deployment.store, record, base))


@router.post("/{response_id}/cancel", responses={**_NOT_FOUND, **_CONFLICT})
async def cancel_response(request: Request, response_id: str) -> Response:
    """Stop a background response; it ends `cancelled` (409 when it already completed or failed)."""
    record = await _record(request, response_id)
    record = await services(request).deployment.runs.cancel(record.tenant, record.message_id)
    return _json(await _fold(services(request).deployment.store, record, _base(record)))


@router.delete("/{response_id}", responses=_NOT_FOUND)
async def delete_response(request: Request, response_id: str) -> Response:
    """Cancel the response if it is still running, then remove it."""
    record = await _record(request, response_id)
    await services(request).deployment.runs.delete(record.tenant, record.message_id)
    return _json({"id": record.message_id, "object": "response.deleted", "deleted": True})


async def _record(request: Request, response_id: str) -> RunRecord:
    record = None
    if MESSAGE_ID.fullmatch(response_id):  # an id that cannot exist is answered like any unknown id
        record = await services(request).deployment.store.get_run(tenant_of(request), response_id)
    if record is None:
        raise NotFound("response")
    return record


def _base(record: RunRecord) -> dict[str, Any]:
    native = orjson.loads(record.request) if record.request else {}
    return dialect.response_base(native, record.message_id, record.created_at, record.model, True)


def _watch(request: Request, record: RunRecord, base: dict[str, Any], starting_after: int) -> Response:
    """Sequence numbers count from the first event, so every watch renders the log from its start."""
    s = services(request)
    renderer = dialect.StreamRenderer(base, starting_after)
    frames = follow_run(s.deployment.store, record.tenant, record.message_id, 0, renderer.feed)
    return EventStreamResponse(frames, keepalive_s=s.settings.keepalive_s)


async def _fold(store: StreamStore, record: RunRecord, base: dict[str, Any]) -> dict[str, Any]:
    """The log so far folded into the response object."""
    folder = MessageFolder()
    finish: str | None = None
    cursor = 0
    read = store.read_stored if record.terminal else store.read  # another replica may have written the end
    while batch := await read(record.tenant, record.message_id, cursor, READ_BATCH):
        for event in batch:
            folder.feed(event)
        cursor = batch[-1].seq
        if batch[-1].type == "stream_end":
            finish = batch[-1].load()["finish_reason"]
    native = folder.message(record.message_id) if cursor else None
    return dialect.response_object(base, native, dialect.status_of(record.status, finish), record.error_message)
