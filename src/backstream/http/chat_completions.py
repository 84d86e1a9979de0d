"""`POST /v1/chat/completions`: OpenAI Chat Completions over a synchronous run (see `sync_runs.py`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..dialects import openai_chat
from ..events import new_message_id
from .chat_body import read_chat_request
from .dialects import translated
from .openapi import ERROR_RESPONSES
from .state import services
from .sync_runs import Answer, run_sync

router = APIRouter()

_EXAMPLE = {
    "model": "local",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Write a haiku about rivers."}],
}
_CHUNK = (
    'data: {"id":"msg_01K...","object":"chat.completion.chunk","created":1776855811,"model":"local",'
    '"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
)


@router.post(
    "/v1/chat/completions",
    tags=["OpenAI dialect"],
    responses={
        200: {
            "description": "A `chat.completion`, or with `stream: true` SSE `chat.completion.chunk`s ending with `[DONE]`",
            "content": {"text/event-stream": {"example": _CHUNK}},
        },
        **ERROR_RESPONSES,
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"example": _EXAMPLE}}}},
)
async def create_chat_completion(request: Request) -> Response:
    """OpenAI Chat Completions: the `openai` SDK's `chat.completions.create` works unchanged.

    `n` must be 1; errors come in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
    """
    params: list[openai_chat.ChatParams] = []

    def parse(body: dict[str, Any]) -> dict[str, Any]:
        params.append(openai_chat.parse_request(body))
        return {**params[0].native, "stream": params[0].stream}

    chat = await read_chat_request(request, services(request).settings, translated(parse))
    include_usage, created = params[0].include_usage, int(time.time())
    answer = Answer(
        encoder=lambda: openai_chat.StreamRenderer(include_usage).feed,
        fold=lambda message: openai_chat.completion(message, created),
        error_after_output=True,
    )
    return await run_sync(request, chat, new_message_id(), answer)
