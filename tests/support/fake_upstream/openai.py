"""The OpenAI chat-completions wire format: streamed chunks, the whole completion, errors."""

from __future__ import annotations

import time
from typing import Any

import orjson

from .script import Reply, usage_of
from .wire import Plan, frame

NAME = "openai"
REQUEST_ID_HEADER = "x-request-id"

_dumps = orjson.dumps

_FINISH = {
    "end_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "stop_sequence": "stop",
    "refusal": "content_filter",
}
_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def response_id(n: int) -> str:
    return f"chatcmpl-fake{n:08x}"


def finish_reason(reply: Reply) -> str:
    """The scripted finish reason in OpenAI's words (Anthropic names are translated)."""
    fr = reply.finish_reason
    if fr is None:
        return "tool_calls" if reply.tool_calls else "stop"
    return _FINISH.get(fr, fr)


def error_body(status: int, etype: str | None = None, message: str | None = None) -> dict:
    t, code = _ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {
        "error": {
            "message": message or f"Fake upstream error {status}",
            "type": etype or t,
            "param": None,
            "code": code,
        }
    }


def overloaded() -> tuple[int, dict]:
    """Fault.ERROR_EVENT on a non-streamed request: an error status instead of the completion."""
    return 500, error_body(500, "server_error", "Overloaded")


def _usage(reply: Reply) -> dict[str, Any]:
    pt, ct = usage_of(reply)
    usage: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    if reply.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(reply.reasoning)}
    if reply.cache[1]:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cache[1]}
    return usage


def _tool_call_header(i: int, tc: Any) -> dict:
    return {
        "tool_calls": [{"index": i, "id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}]
    }


def stream_plan(rid: str, model: str | None, reply: Reply, request: dict) -> Plan:
    """The chunks of a streamed completion; the usage chunk only if the request asked for it."""
    so = request.get("stream_options")
    include_usage = isinstance(so, dict) and so.get("include_usage") is True
    p = Plan()
    # Every chunk shares this prefix; it is encoded once.
    base = b'{"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,"system_fingerprint":null,' % (
        rid.encode(),
        int(time.time()),
        _dumps(model),
    )
    head = b"data: " + base + b'"choices":[{"index":0,"delta":'
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def ev(delta: dict) -> bytes:
        return frame(head + _dumps(delta) + tail)

    p.preamble.append(ev({"role": "assistant", "content": ""}))
    p.body.extend((ev({"reasoning_content": r}), True) for r in reply.reasoning)
    p.body.extend((ev({"content": t}), True) for t in reply.tokens)
    for i, tc in enumerate(reply.tool_calls):
        p.body.append((ev(_tool_call_header(i, tc)), False))
        p.body.extend(
            (ev({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}), True) for frag in tc.arguments
        )

    p.trailer.append(frame(head + b'{},"logprobs":null,"finish_reason":' + _dumps(finish_reason(reply)) + b"}]}\n\n"))
    if include_usage:
        p.trailer.append(frame(b"data: " + base + b'"choices":[],"usage":' + _dumps(_usage(reply)) + b"}\n\n"))
    p.trailer.append(frame(b"data: [DONE]\n\n"))
    p.malformed = frame(b'data: {"choices": [{"delta": {"content": "x"\n\n')
    p.error = frame(
        b"data: "
        + _dumps({"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": None}})
        + b"\n\n"
    )
    return p


def whole(rid: str, model: str | None, reply: Reply) -> dict:
    """The non-streamed completion."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(reply.tokens) if reply.tokens else None,
        "refusal": None,
    }
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": "".join(tc.arguments)}}
            for tc in reply.tool_calls
        ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reply)}],
        "usage": _usage(reply),
    }
