"""OpenAI Responses (`/v1/responses`), including background mode over Backstream's background runs.

A response's id is the run's message_id, so it works on `/v1/messages/async/…` too. The
response object is rebuilt from the stored native request (`response_base`) and the
folded log (`response_object`); the stream numbers its events with `sequence_number`,
which is also the SSE `id:`, so `starting_after` and Last-Event-ID mean the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .common import (
    DialectError,
    cached,
    delta_json,
    dumps,
    function_tool,
    image_source,
    json_schema_format,
    merge_message,
    openai_tool_choice,
    reject_unknown,
    remember,
    require_dict,
    require_list,
    thinking_for_effort,
    tokens,
    tool_input,
    user_metadata,
)
from .openai_chat import error_body

KEY = "responses"

_SAME = (
    "model",
    "temperature",
    "top_p",
    "service_tier",
    "top_k",
    "min_p",
    "repetition_penalty",
    "priority",
    "correlation_id",
    "seed",
)
_HANDLED = (
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "reasoning",
    "max_output_tokens",
    "metadata",
    "user",
    "stream",
    "background",
    "store",
    "previous_response_id",
    "conversation",
    "prompt",
    "top_logprobs",
)
# Options that change nothing here: OpenAI's caching, truncation and include-lists for its own extras.
_IGNORED = (
    "include",
    "truncation",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "stream_options",
    "max_tool_calls",
)
KNOWN = frozenset((*_SAME, *_HANDLED, *_IGNORED))

__all__ = [
    "ResponsesParams",
    "StreamRenderer",
    "error_body",
    "finished_status",
    "parse_request",
    "response_base",
    "response_object",
    "status_of",
]


@dataclass
class ResponsesParams:
    native: dict[str, Any]  # the native request body, for ChatRequest validation
    stream: bool
    background: bool


def parse_request(body: dict[str, Any]) -> ResponsesParams:
    reject_unknown(body, KNOWN)
    for field in ("previous_response_id", "conversation", "prompt", "top_logprobs"):
        if body.get(field) is not None:
            raise DialectError(f"{field} is not supported; send the whole conversation as input", field)
    background = bool(body.get("background"))
    if background and body.get("store") is False:
        raise DialectError("background responses are stored: store must not be false", "store")
    native: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    system, native["messages"] = _input(body.get("input"))
    if body.get("instructions") is not None:
        system.insert(0, body["instructions"])
    if body.get("max_output_tokens") is not None:
        native["max_tokens"] = body["max_output_tokens"]
    if body.get("tools") is not None:
        native["tools"] = [_tool(i, t) for i, t in enumerate(require_list(body["tools"], "tools"))]
    _text_format(body.get("text"), native)
    if body.get("reasoning") is not None:
        effort = require_dict(body["reasoning"], "reasoning").get("effort", "medium")
        native["thinking"] = thinking_for_effort(effort, "reasoning.effort")
    native["system"] = system
    native["tool_choice"] = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    native["metadata"] = user_metadata(body.get("metadata"), body.get("user"))
    # Drop what was not given (not falsy values: temperature 0 is a choice).
    native = {k: v for k, v in native.items() if v is not None and (v or k in _SAME or k == "messages")}
    return ResponsesParams(native, bool(body.get("stream")), background)


def _input(items: Any) -> tuple[list[str], list[dict[str, Any]]]:
    if isinstance(items, str):
        return [], [{"role": "user", "content": items}]
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, item in enumerate(require_list(items, "input")):
        where = f"input.{i}"
        kind = require_dict(item, where).get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                system.append(
                    "".join(b["text"] for b in _content(item.get("content"), f"{where}.content", images=False))
                )
            elif role in ("user", "assistant"):
                merge_message(out, role, _content(item.get("content"), f"{where}.content", images=role == "user"))
            else:
                raise DialectError(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
        elif kind == "function_call":
            block = {
                "type": "tool_use",
                "id": item.get("call_id"),
                "name": item.get("name"),
                "input": tool_input(item.get("arguments"), f"{where}.arguments"),
            }
            merge_message(out, "assistant", [block])
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(b["text"] for b in _content(output, f"{where}.output", images=False))
            merge_message(out, "user", [{"type": "tool_result", "tool_use_id": item.get("call_id"), "content": output}])
        elif kind != "reasoning":  # earlier reasoning is the model's own business: dropped
            raise DialectError(f"input item type {kind!r} is not supported", f"{where}.type")
    return system, out


_TEXT_PARTS = ("input_text", "output_text", "text")


def _content(content: Any, field: str, images: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for j, part in enumerate(require_list(content, field)):
        where = f"{field}.{j}"
        kind = require_dict(part, where).get("type")
        if kind in _TEXT_PARTS:
            blocks.append({"type": "text", "text": part.get("text")})
        elif kind == "refusal":
            blocks.append({"type": "text", "text": part.get("refusal")})
        elif kind == "input_image" and images:
            if part.get("image_url") is None:
                raise DialectError("input_image needs image_url (file ids are not supported)", f"{where}.image_url")
            blocks.append({"type": "image", "source": image_source(part["image_url"], f"{where}.image_url")})
        elif kind == "input_file" and images and part.get("file_data") is not None:
            blocks.append({"type": "document", "source": image_source(part["file_data"], f"{where}.file_data")})
        else:
            raise DialectError(f"content part type {kind!r} is not supported here", f"{where}.type")
    return blocks


def _tool(i: int, tool: Any) -> dict[str, Any]:
    tool = require_dict(tool, f"tools.{i}")
    if tool.get("type") != "function":
        raise DialectError("only function tools are supported", f"tools.{i}.type")
    return function_tool(tool.get("name"), tool.get("description"), tool.get("parameters"))


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    return openai_tool_choice(choice, parallel, lambda c: c.get("name"), '{"type": "function", "name"}')


def _text_format(text: Any, native: dict[str, Any]) -> None:
    if text is None:
        return
    fmt = require_dict(text, "text").get("format")
    if fmt is None:
        return
    kind = require_dict(fmt, "text.format").get("type")
    if kind == "json_schema":
        native["output_config"] = {"format": json_schema_format(fmt, "text.format.schema")}
    elif kind == "json_object":
        native["response_format"] = {"type": "json_object"}
    elif kind != "text":
        raise DialectError('text.format.type must be "text", "json_object" or "json_schema"', "text.format.type")


# --- the response object ---------------------------------------------------------------------------

# A run's ending as a response status; a stream's last event is named after it.
_END_STATUS = {
    "Stop": "completed",
    "StopSequence": "completed",
    "ToolUse": "completed",
    "Length": "incomplete",
    "Error": "failed",
    "Cancelled": "cancelled",
}
_RECORD_STATUS = {
    "pending": "queued",
    "processing": "in_progress",
    "failed": "failed",
    "error": "failed",
    "cancelled": "cancelled",
}
# No stream event is named for cancellation: `response.incomplete` carries status "cancelled".
_END_EVENT = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.incomplete",
}


def finished_status(finish_reason: str) -> str:
    """The status of a response whose run ended with `finish_reason`."""
    return _END_STATUS.get(finish_reason, "failed")


def status_of(run_status: str, finish_reason: str | None) -> str:
    """A background run's status (and its finish reason, once known) as a response status."""
    if run_status == "completed":
        return "incomplete" if finish_reason == "Length" else "completed"
    return _RECORD_STATUS.get(run_status, "failed")


def response_base(
    native: dict[str, Any], response_id: str, created_at: float, model: str, background: bool
) -> dict[str, Any]:
    """What a response says about its request, rebuilt from the native request (best: as validated and stored)."""
    fmt = (native.get("output_config") or {}).get("format")
    text_format: dict[str, Any] = {"type": "text"}
    if fmt:
        text_format = {
            "type": "json_schema",
            "name": fmt.get("name") or "output",
            "schema": fmt.get("schema"),
            "strict": fmt.get("strict"),
        }
    thinking = native.get("thinking") or {}
    choice = native.get("tool_choice") or {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": "queued",
        "background": background,
        "error": None,
        "incomplete_details": None,
        "instructions": "\n\n".join(s if isinstance(s, str) else s["text"] for s in native.get("system") or ()) or None,
        "max_output_tokens": native.get("max_tokens"),
        "metadata": native.get("metadata") or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": not choice.get("disable_parallel_tool_use"),
        "previous_response_id": None,
        "reasoning": {"effort": thinking.get("effort") if thinking.get("enabled") else None, "summary": None},
        "store": True,
        "temperature": native.get("temperature"),
        "text": {"format": text_format},
        "tool_choice": _choice_out(choice),
        "tools": [_tool_out(t) for t in native.get("tools") or ()],
        "top_p": native.get("top_p"),
        "truncation": "disabled",
        "usage": None,
    }


def _choice_out(choice: dict[str, Any]) -> Any:
    kind = choice.get("type", "auto")
    if kind == "tool":
        return {"type": "function", "name": choice.get("name")}
    return {"any": "required"}.get(kind, kind)


def _tool_out(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": tool["input_schema"],
        "strict": False,
    }


def usage(native: dict[str, Any] | None) -> dict[str, Any]:
    prompt, completion = tokens(native, "prompt_tokens"), tokens(native, "completion_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": tokens(native, "cache_read_input_tokens"),
            "cache_write_tokens": tokens(native, "cache_write_input_tokens"),
        },
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": tokens(native, "thought_tokens")},
        "total_tokens": prompt + completion,
    }


def item_id(prefix: str, response_id: str, output_index: int) -> str:
    """Output item ids follow from the response id and the item's place, so stream and fold agree."""
    return f"{prefix}_{response_id.partition('_')[2] or response_id}_{output_index}"


def _message_item(id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part] if status != "in_progress" else [],
    }


def _reasoning_item(id: str, text: str | None) -> dict[str, Any]:
    return {"id": id, "type": "reasoning", "summary": [] if text is None else [{"type": "summary_text", "text": text}]}


def _call_item(id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def output_items(content: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """Folded content blocks as output items; results of tools the server ran are not items."""
    items: list[dict[str, Any]] = []
    for block in content:
        kind, i = block["type"], len(items)
        if kind == "text":
            items.append(_message_item(item_id("msg", response_id, i), block["text"], "completed"))
        elif kind == "thinking":
            items.append(_reasoning_item(item_id("rs", response_id, i), block["thinking"]))
        elif kind == "tool_use":
            args = orjson.dumps(block["input"]).decode()
            items.append(_call_item(item_id("fc", response_id, i), block["id"], block["name"], args, "completed"))
    return items


def output_text(items: list[dict[str, Any]]) -> str:
    return "".join(
        part["text"]
        for item in items
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )


def response_object(
    base: dict[str, Any], native: dict[str, Any] | None, status: str, error_message: str | None = None
) -> dict[str, Any]:
    """The response as `GET /v1/responses/{id}` answers it: the base, the folded log so far, the status."""
    out = {**base, "status": status}
    if native is not None:
        out["model"] = native.get("model") or base["model"]
        out["output"] = output_items(native["content"], base["id"])
        if status not in ("queued", "in_progress"):
            out["usage"] = usage(native.get("usage"))
        error_message = error_message or (native.get("error") or {}).get("message")
    if status == "failed":
        out["error"] = {"code": "server_error", "message": error_message or "the run failed"}
    elif status == "incomplete":
        out["incomplete_details"] = {"reason": "max_output_tokens"}
    out["output_text"] = output_text(out["output"])
    return out


# --- the stream ------------------------------------------------------------------------------------

_TEXT_DELTA = (
    b'id: %d\nevent: response.output_text.delta\ndata: {"type":"response.output_text.delta","item_id":%s,'
    b'"output_index":%d,"content_index":0,"delta":%s,"logprobs":[],"sequence_number":%d}\n\n'
)
_SUMMARY_DELTA = (
    b'id: %d\nevent: response.reasoning_summary_text.delta\ndata: {"type":"response.reasoning_summary_text.delta",'
    b'"item_id":%s,"output_index":%d,"summary_index":0,"delta":%s,"sequence_number":%d}\n\n'
)
_ARGS_DELTA = (
    b'id: %d\nevent: response.function_call_arguments.delta\ndata: {"type":"response.function_call_arguments.delta",'
    b'"item_id":%s,"output_index":%d,"delta":%s,"sequence_number":%d}\n\n'
)
_STATELESS = frozenset(("text_delta", "thinking_delta"))  # their text arrives whole in *_complete
_DELTAS = {"text_delta": _TEXT_DELTA, "thinking_delta": _SUMMARY_DELTA, "tool_call_delta": _ARGS_DELTA}
_LIFECYCLE = b'id: %d\nevent: response.%s\ndata: {"type":"response.%s","response":%s,"sequence_number":%d}\n\n'
# How many frames each canonical event becomes; others become none.
_FRAMES = {
    "stream_start": 2,
    "thinking_start": 2,
    "thinking_delta": 1,
    "thinking_complete": 3,
    "text_start": 2,
    "text_delta": 1,
    "text_complete": 3,
    "tool_call_start": 1,
    "tool_call_delta": 1,
    "tool_call_complete": 2,
    "stream_end": 1,
}


def _frame(seq: int, type: str, data: dict[str, Any]) -> bytes:
    data["type"] = type
    data["sequence_number"] = seq
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, type.encode(), dumps(data))


class StreamRenderer:
    """Canonical events in, Responses stream events out, numbered from 0 by `sequence_number`.

    State (item positions, the output so far) is tracked for every event, even when its
    frames come from the cache; frames are built only when no watcher built them yet.
    Frames numbered up to `starting_after` are not sent.
    """

    def __init__(self, base: dict[str, Any], starting_after: int = -1, shared: bool = True) -> None:
        self.base = base
        self.after = starting_after
        self.shared = shared  # False for a stream nobody else watches (a synchronous run): no caching
        self.seq = 0  # the next sequence_number
        self.model = base["model"]
        self.output: list[dict[str, Any]] = []  # completed items
        self.index = -1  # output_index of the current item
        self.item_id = ""  # its id
        self.item = b'""'  # the same, as JSON for the delta templates
        self.args: list[str] = []  # the current call's argument fragments
        self.call: tuple[str, str] = ("", "")  # its call_id and name

    def feed(self, event: Any, emit: bool = True) -> bytes:
        kind = event.type
        n = _FRAMES.get(kind)
        if n is None:
            return b""
        first = self.seq
        self.seq += n
        if kind not in _STATELESS:
            self._track(kind, event.load())
        if not emit or self.seq - 1 <= self.after:
            return b""
        if not self.shared:
            return b"".join(self._build(kind, event, first))
        hit = cached(event, KEY)
        if hit is None:
            frames = self._build(kind, event, first)
            hit = (frames, b"".join(frames))
            remember(event, KEY, hit)
        return hit[1] if first > self.after else b"".join(hit[0][self.after - first + 1 :])

    def _track(self, kind: str, f: dict[str, Any]) -> None:
        if kind in ("text_start", "thinking_start", "tool_call_start"):
            self.index = len(self.output)
            prefix = {"text_start": "msg", "thinking_start": "rs", "tool_call_start": "fc"}[kind]
            self.item_id = item_id(prefix, self.base["id"], self.index)
            self.item = dumps(self.item_id)
            if kind == "tool_call_start":
                self.args, self.call = [], (f["tool_call_id"], f["name"])
        elif kind == "tool_call_delta":
            self.args.append(f["delta"])
        elif kind == "text_complete":
            self.output.append(_message_item(self.item_id, f["text"], "completed"))
        elif kind == "thinking_complete":
            self.output.append(_reasoning_item(self.item_id, f["thinking"]))
        elif kind == "tool_call_complete":
            args = "".join(self.args) or orjson.dumps(f["input"]).decode()
            self.output.append(_call_item(self.item_id, *self.call, args, "completed"))
        elif kind == "stream_start":
            self.model = f["model"]

    def _response(self, status: str, f: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {**self.base, "status": status, "model": self.model, "output": list(self.output)}
        if f is not None:
            out["usage"] = usage(f.get("usage"))
            if status == "failed":
                out["error"] = {
                    "code": "server_error",
                    "message": (f.get("error") or {}).get("message") or "the run failed",
                }
            elif status == "incomplete":
                out["incomplete_details"] = {"reason": "max_output_tokens"}
            out["output_text"] = output_text(self.output)
        return out

    def _build(self, kind: str, event: Any, seq: int) -> list[bytes]:
        delta = _DELTAS.get(kind)
        if delta is not None:  # the hot path: one frame, the delta's JSON cut from the event's bytes
            return [delta % (seq, self.item, self.index, delta_json(event), seq)]
        f = event.load()
        if kind == "stream_start":
            response = dumps(self._response("in_progress"))  # the same object in both: serialised once
            return [
                _LIFECYCLE % (seq, b"created", b"created", response, seq),
                _LIFECYCLE % (seq + 1, b"in_progress", b"in_progress", response, seq + 1),
            ]
        if kind == "stream_end":
            status = _END_STATUS[f["finish_reason"]]
            return [_frame(seq, _END_EVENT[status], {"response": self._response(status, f)})]
        at = {"item_id": self.item_id, "output_index": self.index}
        return _ITEM_FRAMES[kind](self, at, f, seq)

    def _text_start(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        item = _message_item(at["item_id"], "", "in_progress")
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            _frame(seq, "response.output_item.added", {"output_index": self.index, "item": item}),
            _frame(seq + 1, "response.content_part.added", {**at, "content_index": 0, "part": part}),
        ]

    def _text_end(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        item = self.output[-1]
        return [
            _frame(seq, "response.output_text.done", {**at, "content_index": 0, "text": f["text"], "logprobs": []}),
            _frame(seq + 1, "response.content_part.done", {**at, "content_index": 0, "part": item["content"][0]}),
            _frame(seq + 2, "response.output_item.done", {"output_index": self.index, "item": item}),
        ]

    def _thinking_start(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        part = {"type": "summary_text", "text": ""}
        return [
            _frame(
                seq,
                "response.output_item.added",
                {"output_index": self.index, "item": _reasoning_item(at["item_id"], None)},
            ),
            _frame(seq + 1, "response.reasoning_summary_part.added", {**at, "summary_index": 0, "part": part}),
        ]

    def _thinking_end(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        item = self.output[-1]
        return [
            _frame(seq, "response.reasoning_summary_text.done", {**at, "summary_index": 0, "text": f["thinking"]}),
            _frame(
                seq + 1, "response.reasoning_summary_part.done", {**at, "summary_index": 0, "part": item["summary"][0]}
            ),
            _frame(seq + 2, "response.output_item.done", {"output_index": self.index, "item": item}),
        ]

    def _call_start(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        item = _call_item(at["item_id"], *self.call, "", "in_progress")
        return [_frame(seq, "response.output_item.added", {"output_index": self.index, "item": item})]

    def _call_end(self, at: dict[str, Any], f: dict[str, Any], seq: int) -> list[bytes]:
        item = self.output[-1]
        done = {**at, "name": item["name"], "arguments": item["arguments"]}
        return [
            _frame(seq, "response.function_call_arguments.done", done),
            _frame(seq + 1, "response.output_item.done", {"output_index": self.index, "item": item}),
        ]


_ITEM_FRAMES = {
    "text_start": StreamRenderer._text_start,
    "text_complete": StreamRenderer._text_end,
    "thinking_start": StreamRenderer._thinking_start,
    "thinking_complete": StreamRenderer._thinking_end,
    "tool_call_start": StreamRenderer._call_start,
    "tool_call_complete": StreamRenderer._call_end,
}
