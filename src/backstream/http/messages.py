"""`POST /v1/messages`: a synchronous run, streamed as SSE or folded into one JSON message,
in the native format or, when the client asks for it, Anthropic's (see `sync_runs.py`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..api_models import MessageResponse
from ..dialects import anthropic
from ..events import new_message_id
from .chat_body import read_chat_request
from .dialects import translated, wants_anthropic
from .openapi import ERROR_RESPONSES, chat_body_doc
from .state import services
from .sync_runs import Answer, run_sync

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
    """Run a chat request; `stream: true` answers with SSE events, otherwise one JSON message.

    With an `anthropic-version` header (or `?format=anthropic`) the request and the answer
    are Anthropic Messages: the Anthropic SDK works unchanged.
    """
    settings = services(request).settings
    if wants_anthropic(request.scope):
        chat = await read_chat_request(request, settings, translated(anthropic.parse_request))
        return await run_sync(request, chat, new_message_id(), ANTHROPIC_ANSWER)
    chat = await read_chat_request(request, settings)
    return await run_sync(request, chat, new_message_id())


ANTHROPIC_ANSWER = Answer(
    encoder=lambda: anthropic.StreamRenderer(shared=False).feed, fold=anthropic.message, error_after_output=True
)
