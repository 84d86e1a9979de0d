"""The Anthropic messages wire format: streamed events, the whole message, errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .script import Reply, ToolCall, usage_of
from .wire import Plan, frame

NAME = "anthropic"
REQUEST_ID_HEADER = "request-id"

_dumps = orjson.dumps

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "stop_sequence": "stop_sequence",
    "content_filter": "refusal",
}
_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def response_id(n: int) -> str:
    return f"msg_fake{n:08x}"


def stop_reason(reply: Reply) -> str:
    """The scripted finish reason in Anthropic's words (OpenAI names are translated)."""
    fr = reply.finish_reason
    if fr is None:
        return "tool_use" if reply.tool_calls else "end_turn"
    return _STOP.get(fr, fr)


def error_body(status: int, etype: str | None = None, message: str | None = None) -> dict:
    t = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": etype or t, "message": message or f"Fake upstream error {status}"}}


def overloaded() -> tuple[int, dict]:
    """Fault.ERROR_EVENT on a non-streamed request: an error status instead of the message."""
    return 529, error_body(529, "overloaded_error", "Overloaded")


def _event(name: bytes, payload: dict) -> bytes:
    return frame(b"event: " + name + b"\ndata: " + _dumps(payload) + b"\n\n")


def _message_start(mid: str, model: str | None, reply: Reply) -> bytes:
    pt, _ = usage_of(reply)
    usage = {
        "input_tokens": pt,
        "output_tokens": 1,
        "cache_creation_input_tokens": reply.cache[0],
        "cache_read_input_tokens": reply.cache[1],
    }
    message: dict[str, Any] = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return _event(b"message_start", {"type": "message_start", "message": message})


class _Blocks:
    """Appends content blocks (start, deltas, stop) to a plan, numbering them."""

    def __init__(self, plan: Plan) -> None:
        self.body = plan.body
        self.index = 0

    def add(self, block: dict, deltas: Sequence[dict], trailing: Sequence[dict] = ()) -> None:
        """`deltas` are content chunks (counted for pacing and faults), `trailing` are not."""
        self.body.append(
            (
                _event(
                    b"content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}
                ),
                False,
            )
        )
        prefix = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":' % self.index
        self.body.extend((frame(prefix + _dumps(d) + b"}\n\n"), True) for d in deltas)
        self.body.extend((frame(prefix + _dumps(d) + b"}\n\n"), False) for d in trailing)
        self.body.append((_event(b"content_block_stop", {"type": "content_block_stop", "index": self.index}), False))
        self.index += 1


def stream_plan(mid: str, model: str | None, reply: Reply, request: dict) -> Plan:
    """The events of a streamed message: thinking, text, then tool_use blocks."""
    p = Plan()
    p.preamble += [_message_start(mid, model, reply), _event(b"ping", {"type": "ping"})]
    blocks = _Blocks(p)
    if reply.reasoning:
        thinking = [{"type": "thinking_delta", "thinking": r} for r in reply.reasoning]
        blocks.add(
            {"type": "thinking", "thinking": "", "signature": ""},
            thinking,
            [{"type": "signature_delta", "signature": "fake-signature"}],
        )
    if reply.tokens:
        blocks.add({"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in reply.tokens])
    for tc in reply.tool_calls:
        args = [{"type": "input_json_delta", "partial_json": frag} for frag in tc.arguments]
        blocks.add({"type": "tool_use", "id": tc.id, "name": tc.name, "input": {}}, args)

    _, ct = usage_of(reply)
    usage: dict[str, Any] = {"output_tokens": ct}
    if reply.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": len(reply.reasoning)}
    delta = {"stop_reason": stop_reason(reply), "stop_sequence": None}
    p.trailer.append(_event(b"message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    p.trailer.append(_event(b"message_stop", {"type": "message_stop"}))
    p.malformed = frame(
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
        b'"delta": {"type": "text_delta", "text": "x"\n\n'
    )
    p.error = frame(
        b"event: error\ndata: "
        + _dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        + b"\n\n"
    )
    return p


def _tool_input(tc: ToolCall) -> Any:
    """The streamed argument fragments as one object ({} if they do not parse)."""
    raw = "".join(tc.arguments)
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}


def whole(mid: str, model: str | None, reply: Reply) -> dict:
    """The non-streamed message."""
    content: list[dict] = []
    if reply.reasoning:
        content.append({"type": "thinking", "thinking": "".join(reply.reasoning), "signature": "fake-signature"})
    if reply.tokens:
        content.append({"type": "text", "text": "".join(reply.tokens)})
    content.extend(
        {"type": "tool_use", "id": tc.id, "name": tc.name, "input": _tool_input(tc)} for tc in reply.tool_calls
    )
    pt, ct = usage_of(reply)
    usage = {
        "input_tokens": pt,
        "output_tokens": ct,
        "cache_creation_input_tokens": reply.cache[0],
        "cache_read_input_tokens": reply.cache[1],
    }
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(reply),
        "stop_sequence": None,
        "usage": usage,
    }
