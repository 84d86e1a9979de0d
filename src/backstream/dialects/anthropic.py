"""Anthropic Messages: the request is nearly the native one; the stream and the message are not.

Selected on `POST /v1/messages` and `GET /v1/messages/async/{id}/stream` by the
`anthropic-version` header (the Anthropic SDK always sends it) or `?format=anthropic`.
"""

from __future__ import annotations

from typing import Any

import orjson

from .common import DialectError, cached, delta_json, dumps, remember, tokens

KEY = "anthropic"

STOP_REASONS = {"Stop": "end_turn", "Length": "max_tokens", "StopSequence": "stop_sequence", "ToolUse": "tool_use"}
# Anthropic's error types; ours that it lacks become the nearest one.
ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "conflict_error": "invalid_request_error",
    "request_too_large": "request_too_large",
    "rate_limit_error": "rate_limit_error",
    "timeout_error": "timeout_error",
    "overloaded_error": "overloaded_error",
}
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def wanted(anthropic_version: str | None, format: str | None) -> bool:
    """Whether a request asked for this dialect."""
    return anthropic_version is not None or format == "anthropic"


# --- request ----------------------------------------------------------------------------------


def parse_request(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body as a native one: only what differs is touched."""
    native = dict(body)
    native.pop("speed", None)  # Anthropic's service speed: no meaning here
    if native.get("diagnostics") is None:
        native.pop("diagnostics", None)
    if isinstance(native.get("tools"), list):
        native["tools"] = [_tool(i, t) for i, t in enumerate(native["tools"])]
    output_config = native.get("output_config")
    if isinstance(output_config, dict) and output_config.get("effort") in _EFFORT:
        native["output_config"] = {**output_config, "effort": _EFFORT[output_config["effort"]]}
    thinking = native.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("adaptive", "between_tools"):
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        native["thinking"] = {"enabled": True, "effort": _EFFORT.get(effort or "medium", "medium")}
    metadata = native.get("metadata")
    if isinstance(metadata, dict):
        native["metadata"] = {k: v for k, v in metadata.items() if v is not None}
    return native


def _tool(i: int, tool: Any) -> Any:
    if not isinstance(tool, dict) or "type" not in tool:
        return tool
    if tool["type"] in ("custom", None):
        return {k: v for k, v in tool.items() if k != "type"}
    raise DialectError(
        f"server tool {tool['type']!r} is not supported; give client tools with an input_schema", f"tools.{i}.type"
    )


# --- errors -----------------------------------------------------------------------------------


def error_object(type: str, message: str) -> dict[str, Any]:
    return {"type": ERROR_TYPES.get(type, "api_error"), "message": message}


def error_body(type: str, message: str, request_id: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error = error_object(type, message)
    if details:
        error["details"] = details
    return dumps({"type": "error", "error": error, "request_id": request_id})


# --- the non-streamed message -------------------------------------------------------------------


def usage(native: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": tokens(native, "prompt_tokens"),
        "output_tokens": tokens(native, "completion_tokens"),
        "cache_creation_input_tokens": (native or {}).get("cache_write_input_tokens"),
        "cache_read_input_tokens": (native or {}).get("cache_read_input_tokens"),
    }
    if (native or {}).get("thought_tokens"):
        out["output_tokens_details"] = {"thinking_tokens": native["thought_tokens"]}  # type: ignore[index]
    return out


def content_block(block: dict[str, Any]) -> dict[str, Any]:
    kind = block["type"]
    if kind == "thinking":
        return {"type": "thinking", "thinking": block["thinking"], "signature": block.get("signature") or ""}
    if kind == "tool_result":  # a call the server ran itself (MCP): Anthropic's MCP connector shape
        content = block["content"]
        text = content if isinstance(content, str) else orjson.dumps(content).decode()
        return {
            "type": "mcp_tool_result",
            "tool_use_id": block["tool_use_id"],
            "is_error": block["is_error"],
            "content": [{"type": "text", "text": text}],
        }
    return block


def message(native: dict[str, Any]) -> dict[str, Any]:
    """The native folded message (MessageFolder) as an Anthropic `message` object."""
    return {
        "id": native["id"],
        "type": "message",
        "role": "assistant",
        "model": native["model"],
        "content": [content_block(b) for b in native["content"]],
        "stop_reason": STOP_REASONS.get(native["finish_reason"], "end_turn"),
        "stop_sequence": None,
        "usage": usage(native.get("usage")),
    }


# --- the stream ---------------------------------------------------------------------------------

# The hot path: one format per delta, the delta's JSON cut from the event's bytes.
_DELTAS = {
    "text_delta": b'id: %d\nevent: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"text_delta","text":%s}}\n\n',
    "thinking_delta": b'id: %d\nevent: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"thinking_delta","thinking":%s}}\n\n',
    "tool_call_delta": b'id: %d\nevent: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":"input_json_delta","partial_json":%s}}\n\n',
}
_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _frame(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), dumps(data))


def _block_start(index: int, block: dict[str, Any]) -> bytes:
    return _frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


class StreamRenderer:
    """Canonical events in, Anthropic's SSE out, one stream at a time.

    The only state is the number of content blocks started (the open block is the last
    one: blocks never nest). The last frame of each event's frames carries `id: <seq>`,
    so a client's Last-Event-ID only moves past an event once all of it arrived. To
    resume after a cursor, feed the events up to it with `emit=False` first.
    """

    def __init__(self, shared: bool = True) -> None:
        self.blocks = 0
        self.shared = shared  # False for a stream nobody else watches (a synchronous run): no caching

    def feed(self, event: Any, emit: bool = True) -> bytes:
        kind = event.type
        if kind in _OPENS:
            self.blocks += 1
        if not emit or kind not in _SHOWN:
            return b""
        if not self.shared:
            return self._render(kind, event)
        out = cached(event, KEY)
        if out is None:
            out = self._render(kind, event)
            remember(event, KEY, out)
        return out

    def _render(self, kind: str, event: Any) -> bytes:
        template = _DELTAS.get(kind)
        if template is not None:
            return template % (event.seq, self.blocks - 1, delta_json(event))
        before, last = _BUILD[kind](self.blocks - 1, event.load())
        return b"%sid: %d\n%s" % (before, event.seq, last)


def _start(_: int, f: dict[str, Any]) -> tuple[bytes, bytes]:
    message = {
        "id": f["message_id"],
        "type": "message",
        "role": "assistant",
        "model": f["model"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return _frame("message_start", {"type": "message_start", "message": message}), _PING


def _end(_: int, f: dict[str, Any]) -> tuple[bytes, bytes]:
    reason = f["finish_reason"]
    if reason == "Error" or reason == "Cancelled":
        # Anthropic has no stop reason for either: the message did not finish, so say why.
        error = f.get("error") or {
            "type": "api_error",
            "message": "the run was cancelled" if reason == "Cancelled" else "the run failed",
        }
        return b"", _frame("error", {"type": "error", "error": error_object(error["type"], error["message"])})
    delta = {"stop_reason": STOP_REASONS[reason], "stop_sequence": None}
    return _frame("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(f.get("usage"))}), _STOP


def _thinking_end(i: int, f: dict[str, Any]) -> tuple[bytes, bytes]:
    if not f.get("signature"):
        return b"", _BLOCK_STOP % i
    delta = {"type": "signature_delta", "signature": f["signature"]}
    return _frame("content_block_delta", {"type": "content_block_delta", "index": i, "delta": delta}), _BLOCK_STOP % i


def _tool_result(i: int, f: dict[str, Any]) -> tuple[bytes, bytes]:
    block = content_block(
        {"type": "tool_result", "tool_use_id": f["tool_call_id"], "content": f["content"], "is_error": f["is_error"]}
    )
    return _block_start(i, block), _BLOCK_STOP % i


_OPENS = frozenset(("text_start", "thinking_start", "tool_call_start", "tool_result"))
_BUILD = {
    "stream_start": _start,
    "text_start": lambda i, f: (b"", _block_start(i, {"type": "text", "text": ""})),
    "text_complete": lambda i, f: (b"", _BLOCK_STOP % i),
    "thinking_start": lambda i, f: (b"", _block_start(i, {"type": "thinking", "thinking": "", "signature": ""})),
    "thinking_complete": _thinking_end,
    "tool_call_start": lambda i, f: (
        b"",
        _block_start(i, {"type": "tool_use", "id": f["tool_call_id"], "name": f["name"], "input": {}}),
    ),
    "tool_call_complete": lambda i, f: (b"", _BLOCK_STOP % i),
    "tool_result": _tool_result,
    "stream_end": _end,
}
_SHOWN = frozenset((*_BUILD, *_DELTAS))
