"""OpenAI Chat Completions (`POST /v1/chat/completions`), streamed and not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .common import (
    DialectError,
    delta_json,
    dumps,
    function_tool,
    image_source,
    json_schema_format,
    merge_message,
    openai_tool_choice,
    reject_unknown,
    require_dict,
    require_list,
    thinking_for_effort,
    tokens,
    tool_input,
    user_metadata,
)

FINISH_REASONS = {"Stop": "stop", "Length": "length", "StopSequence": "stop", "ToolUse": "tool_calls"}

# Native fields with the same name and meaning; also Backstream extensions (`extra_body`).
_SAME = (
    "model",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "service_tier",
    "top_k",
    "min_p",
    "repetition_penalty",
    "priority",
    "correlation_id",
)
_HANDLED = (
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "user",
    "metadata",
    "n",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "modalities",
)
# OpenAI options that change nothing here (caching keys, storage for OpenAI's dashboard).
_IGNORED = ("store", "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "verbosity")
KNOWN = frozenset((*_SAME, *_HANDLED, *_IGNORED))


@dataclass
class ChatParams:
    native: dict[str, Any]  # the native request body, for ChatRequest validation
    stream: bool
    include_usage: bool


def parse_request(body: dict[str, Any]) -> ChatParams:
    reject_unknown(body, KNOWN)
    _refuse_unsupported(body)
    native: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    system, native["messages"] = _messages(require_list(body.get("messages"), "messages"))
    if system:
        native["system"] = system
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        native["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        native["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("tools") is not None:
        native["tools"] = [_tool(i, t) for i, t in enumerate(require_list(body["tools"], "tools"))]
    tool_choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if tool_choice is not None:
        native["tool_choice"] = tool_choice
    _response_format(body.get("response_format"), native)
    thinking = thinking_for_effort(body.get("reasoning_effort"), "reasoning_effort")
    if thinking is not None:
        native["thinking"] = thinking
    metadata = user_metadata(body.get("metadata"), body.get("user"))
    if metadata:
        native["metadata"] = metadata
    options = body.get("stream_options") or {}
    return ChatParams(
        native, bool(body.get("stream")), bool(require_dict(options, "stream_options").get("include_usage"))
    )


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Options that would change the answer in ways this server cannot give: 422, never ignored."""
    if body.get("n") not in (None, 1):
        raise DialectError("n must be 1: one choice per request", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise DialectError("logprobs are not supported", "logprobs" if body.get("logprobs") else "top_logprobs")
    if body.get("logit_bias"):
        raise DialectError("logit_bias is not supported", "logit_bias")
    if body.get("modalities") not in (None, ["text"]):
        raise DialectError('only the "text" modality is supported', "modalities")


def _messages(messages: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        m = require_dict(m, where)
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(_text_only(m.get("content"), f"{where}.content"))
        elif role == "user":
            merge_message(out, "user", _user_blocks(m.get("content"), f"{where}.content"))
        elif role == "assistant":
            merge_message(out, "assistant", _assistant_blocks(m, where))
        elif role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id"),
                "content": _text_only(m.get("content"), f"{where}.content"),
            }
            merge_message(out, "user", [block])
        else:
            raise DialectError(f"{where}.role must be system, developer, user, assistant or tool", f"{where}.role")
    return system, out


def _text_only(content: Any, field: str) -> str:
    if isinstance(content, str):
        return content
    parts = require_list(content, field)
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise DialectError("only text parts are allowed here", f"{field}.{j}")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _user_blocks(content: Any, field: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for j, part in enumerate(require_list(content, field)):
        where = f"{field}.{j}"
        kind = require_dict(part, where).get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text")})
        elif kind == "image_url":
            url = require_dict(part.get("image_url"), f"{where}.image_url").get("url")
            blocks.append({"type": "image", "source": image_source(url, f"{where}.image_url.url")})
        elif kind == "file":
            data = require_dict(part.get("file"), f"{where}.file").get("file_data")
            if data is None:
                raise DialectError(
                    "file parts need file_data (uploaded file ids are not supported)", f"{where}.file.file_data"
                )
            blocks.append({"type": "document", "source": image_source(data, f"{where}.file.file_data")})
        else:
            raise DialectError(f"content part type {kind!r} is not supported", f"{where}.type")
    return blocks


def _assistant_blocks(m: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = m.get("content")
    if content is not None:
        if not isinstance(content, str):  # text and refusal parts
            content = "".join(
                p.get("text") or p.get("refusal") or ""
                for p in require_list(content, f"{where}.content")
                if isinstance(p, dict)
            )
        if content:
            blocks.append({"type": "text", "text": content})
    for j, call in enumerate(m.get("tool_calls") or ()):
        at = f"{where}.tool_calls.{j}"
        function = require_dict(require_dict(call, at).get("function"), f"{at}.function")
        arguments = tool_input(function.get("arguments"), f"{at}.function.arguments")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    if not blocks:
        blocks.append({"type": "text", "text": ""})
    return blocks


def _tool(i: int, tool: Any) -> dict[str, Any]:
    tool = require_dict(tool, f"tools.{i}")
    if tool.get("type") != "function":
        raise DialectError("only function tools are supported", f"tools.{i}.type")
    f = require_dict(tool.get("function"), f"tools.{i}.function")
    return function_tool(f.get("name"), f.get("description"), f.get("parameters"))


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    def name(c: dict[str, Any]) -> Any:
        return require_dict(c.get("function"), "tool_choice.function").get("name")

    return openai_tool_choice(choice, parallel, name, '{"type": "function", "function": {"name"}}')


def _response_format(spec: Any, native: dict[str, Any]) -> None:
    if spec is None:
        return
    kind = require_dict(spec, "response_format").get("type")
    if kind == "json_schema":
        js = require_dict(spec.get("json_schema"), "response_format.json_schema")
        native["output_config"] = {"format": json_schema_format(js, "response_format.json_schema.schema")}
    elif kind == "json_object":
        native["response_format"] = {"type": "json_object"}
    elif kind != "text":
        raise DialectError(
            'response_format.type must be "text", "json_object" or "json_schema"', "response_format.type"
        )


# --- errors (OpenAI's shape, shared with the Responses dialect) ----------------------------------

_CODES = {
    "rate_limit_error": "rate_limit_exceeded",
    "not_found_error": "not_found",
    "authentication_error": "invalid_api_key",
}


def error_body(type: str, message: str, request_id: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {
        "message": message,
        "type": type,
        "param": details[0].get("field") if details else None,
        "code": _CODES.get(type, type),
    }
    if details:
        error["details"] = details
    return dumps({"error": error, "request_id": request_id})


# --- the non-streamed completion ------------------------------------------------------------------


def usage(native: dict[str, Any] | None) -> dict[str, Any]:
    prompt, completion = tokens(native, "prompt_tokens"), tokens(native, "completion_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": tokens(native, "cache_read_input_tokens")},
        "completion_tokens_details": {"reasoning_tokens": tokens(native, "thought_tokens")},
    }


def _tool_call(block: dict[str, Any]) -> dict[str, Any]:
    arguments = orjson.dumps(block["input"]).decode()
    return {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}


def completion(native: dict[str, Any], created: int) -> dict[str, Any]:
    """The native folded message (MessageFolder) as a `chat.completion`."""
    blocks = native["content"]
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
    calls = [_tool_call(b) for b in blocks if b["type"] == "tool_use"]
    if calls:
        message["tool_calls"] = calls
    thinking = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    if thinking:
        message["reasoning_content"] = thinking  # the field vLLM and DeepSeek use; the SDK keeps extras
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": FINISH_REASONS.get(native["finish_reason"], "stop"),
        "logprobs": None,
    }
    return {
        "id": native["id"],
        "object": "chat.completion",
        "created": created,
        "model": native["model"],
        "choices": [choice],
        "usage": usage(native.get("usage")),
    }


# --- the stream -----------------------------------------------------------------------------------

_DONE = b"data: [DONE]\n\n"


class StreamRenderer:
    """Canonical events in, `chat.completion.chunk` SSE out; the stream ends with `data: [DONE]`.

    Chat streams belong to one synchronous request, so nothing is shared or cached; the
    chunk's constant prefix is built once at stream_start and each delta is one format.
    """

    def __init__(self, include_usage: bool = False) -> None:
        self.include_usage = include_usage
        self.prefix = b""
        self.calls = -1  # index of the current tool call

    def feed(self, event: Any, emit: bool = True) -> bytes:
        kind = event.type
        if kind == "text_delta":
            return self._chunk(b'{"content":%s}' % delta_json(event))
        if kind == "thinking_delta":
            return self._chunk(b'{"reasoning_content":%s}' % delta_json(event))
        if kind == "tool_call_delta":
            return self._chunk(
                b'{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}' % (self.calls, delta_json(event))
            )
        if kind == "tool_call_start":
            self.calls += 1
            f = event.load()
            call = {
                "index": self.calls,
                "id": f["tool_call_id"],
                "type": "function",
                "function": {"name": f["name"], "arguments": ""},
            }
            return self._chunk(dumps({"tool_calls": [call]}))
        if kind == "stream_start":
            f = event.load()
            self.prefix = b'data: {"id":%s,"object":"chat.completion.chunk","created":%d,"model":%s,' % (
                dumps(f["message_id"]),
                f["timestamp"],
                dumps(f["model"]),
            )
            return self._chunk(b'{"role":"assistant","content":""}')
        if kind == "stream_end":
            return self._end(event.load())
        return b""

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return b'%s"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n' % (self.prefix, delta, finish)

    def _end(self, f: dict[str, Any]) -> bytes:
        reason = f["finish_reason"]
        if reason == "Error" or reason == "Cancelled":
            # The SDK raises APIError for a chunk that carries "error".
            error = f.get("error") or {"type": "cancelled", "message": "the run was cancelled"}
            body = {"message": error["message"], "type": error["type"], "param": None, "code": error["type"]}
            return b"data: %s\n\n%s" % (dumps({"error": body}), _DONE)
        out = self._chunk(b"{}", b'"%s"' % FINISH_REASONS[reason].encode())
        if self.include_usage:
            out += b'%s"choices":[],"usage":%s}\n\n' % (self.prefix, dumps(usage(f.get("usage"))))
        return out + _DONE
