"""Any OpenAI-compatible chat-completions endpoint, through the official SDK.

The SDK builds, authenticates and sends the request and maps HTTP errors; the
response body is read raw and parsed with orjson, because building a typed
chunk object per token costs more than the rest of the hot path (see
bench/sdk_parse.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

import httpx2 as httpx  # the transport both official SDKs are built on
import openai
import orjson

from .. import tracing
from ..api_models import (
    ChatRequest,
    DocumentBlock,
    ImageBlock,
    TextBlock,
    ThinkingEffort,
    ThinkingEnabled,
    ToolResultBlock,
    ToolUseBlock,
)
from ..config import ModelConfig
from .base import UPSTREAM, Delta, Provider, SSEDecoder, UpstreamError, sdk_error, timeout_for
from .transport import sdk_http_client

_FINISH = {
    "stop": "Stop",
    "length": "Length",
    "tool_calls": "ToolUse",
    "function_call": "ToolUse",
    "content_filter": "Stop",
}
_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}


def effort_for(thinking: Any) -> str | None:
    """Map either thinking form onto an OpenAI `reasoning_effort`."""
    if isinstance(thinking, ThinkingEffort):
        return thinking.effort if thinking.enabled else None
    if isinstance(thinking, ThinkingEnabled):
        b = thinking.budget_tokens
        return "low" if b < 2048 else "medium" if b < 8192 else "high"
    return None


def _image_url(block: ImageBlock) -> str:
    src = block.source
    return src.url if src.type == "url" else f"data:{src.media_type};base64,{src.data}"


def _user_parts(blocks: list[Any], warnings: list[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for b in blocks:
        if isinstance(b, TextBlock):
            parts.append({"type": "text", "text": b.text})
        elif isinstance(b, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b)}})
        elif isinstance(b, DocumentBlock):
            src = b.source
            if src.type == "text":
                parts.append({"type": "text", "text": src.data})
            elif src.type == "base64":
                parts.append(
                    {
                        "type": "file",
                        "file": {
                            "file_data": f"data:{src.media_type};base64,{src.data}",
                            "filename": b.title or "document",
                        },
                    }
                )
            else:
                parts.append({"type": "text", "text": f"[document: {src.url}]"})
    return parts


def to_openai_messages(request: ChatRequest, warnings: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": request.system_text})
    for m in request.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        if m.role == "assistant":
            text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
            msg: dict[str, Any] = {"role": "assistant", "content": text or None}
            calls = [
                {
                    "id": b.id,
                    "type": "function",
                    "function": {"name": b.name, "arguments": orjson.dumps(b.input).decode()},
                }
                for b in m.content
                if isinstance(b, ToolUseBlock)
            ]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        # Tool results become `tool` messages, which must directly follow the assistant's calls.
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                content = b.text()
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": b.tool_use_id,
                        "content": f"Error: {content}" if b.is_error else content,
                    }
                )
        parts = _user_parts(m.content, warnings)
        if parts:
            if all(p["type"] == "text" for p in parts):
                out.append({"role": "user", "content": "".join(p["text"] for p in parts)})
            else:
                out.append({"role": "user", "content": parts})
    return out


def chunk_deltas(chunk: dict[str, Any]) -> list[Delta]:
    """One OpenAI `chat.completion.chunk` (parsed) -> deltas."""
    out: list[Delta] = []
    err = chunk.get("error")
    if err:
        if isinstance(err, dict):
            out.append(("error", UPSTREAM, str(err.get("message") or err)))
        else:
            out.append(("error", UPSTREAM, str(err)))
        return out
    for choice in chunk.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            out.append(("thinking", reasoning))
        content = delta.get("content")
        if content:
            out.append(("text", content))
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            fn = call.get("function") or {}
            if call.get("id") or fn.get("name"):
                out.append(("tool_start", index, call.get("id"), fn.get("name")))
            if fn.get("arguments"):
                out.append(("tool_delta", index, fn["arguments"]))
        reason = choice.get("finish_reason")
        if reason:
            out.append(("finish", _FINISH.get(reason, "Stop")))
    usage = chunk.get("usage")
    if usage:
        details = usage.get("completion_tokens_details") or {}
        prompt_details = usage.get("prompt_tokens_details") or {}
        out.append(
            (
                "usage",
                {
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                    "cache_read_input_tokens": prompt_details.get("cached_tokens"),
                    "thought_tokens": details.get("reasoning_tokens"),
                },
            )
        )
    return out


def build_payload(
    config: ModelConfig, request: ChatRequest, warnings: list[str], *, extra_sampling: bool
) -> dict[str, Any]:
    """The chat-completions body. `extra_sampling`: the endpoint honours top_k/min_p/repeat_penalty."""
    body: dict[str, Any] = {
        "model": config.upstream_model,
        "messages": to_openai_messages(request, warnings),
        "max_tokens": request.max_tokens or config.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "service_tier"):
        value = getattr(request, key)
        if value is not None:
            body[key] = value
    if request.stop_sequences:
        body["stop"] = request.stop_sequences
    extras = {"top_k": request.top_k, "min_p": request.min_p, "repetition_penalty": request.repetition_penalty}
    for key, value in extras.items():
        if value is None:
            continue
        if extra_sampling:
            body["repeat_penalty" if key == "repetition_penalty" and config.provider == "local" else key] = value
        else:
            warnings.append(f"{key} is not supported by provider openai and was dropped")
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in request.tools
        ]
        tc = request.tool_choice
        if tc is not None:
            body["tool_choice"] = (
                {"type": "function", "function": {"name": tc.name}} if tc.type == "tool" else _TOOL_CHOICE[tc.type]
            )
            if tc.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
    fmt = request.output_format
    if fmt is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.name or "output",
                "schema": fmt.schema_,
                **({"strict": fmt.strict} if fmt.strict is not None else {}),
            },
        }
    effort = effort_for(request.thinking)
    if effort:
        body["reasoning_effort"] = effort
    if request.metadata and request.metadata.get("user_id"):
        body["user"] = request.metadata["user_id"]
    _warn_dropped(config, request, warnings)
    return body


def _warn_dropped(config: ModelConfig, request: ChatRequest, warnings: list[str]) -> None:
    # context_management and maximum_loaded_skills are the gateway's own (context window, skill tools), and so
    # is a container that code_execution_v1 uses.
    own_container = request.uses_builtin("code_execution_v1")
    for key in ("inference_geo", "cache_control", *(() if own_container else ("container",))):
        if getattr(request, key) is not None:
            warnings.append(f"{key} is not supported by provider {config.provider} and was dropped")


class OpenAIProvider(Provider):
    """Streams from an OpenAI-compatible chat completions API."""

    name = "openai"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "none",  # many compatible servers need no key; the SDK insists on one
            base_url=config.base_url,
            max_retries=0,  # retries and fallbacks are ours: only before the first token
            timeout=timeout_for(config),
            http_client=sdk_http_client(timeout_for(config)),
        )

    async def stream(self, request: ChatRequest, warnings: list[str]) -> AsyncGenerator[Delta, None]:
        body = build_payload(self.config, request, warnings, extra_sampling=self.config.extra_sampling)
        model = body.pop("model")
        unavailable = self.unavailable()
        if unavailable is not None:  # never call upstream with a placeholder key
            raise unavailable
        try:
            # The body is already validated and shaped: it goes in extra_body as it is, so the SDK's
            # per-field transform (a walk over every message) is skipped; see bench/sdk_parse.py.
            async with self._client.chat.completions.with_streaming_response.create(
                model=model, messages=[], stream=True, extra_body=body, extra_headers=tracing.headers()
            ) as response:
                decoder = SSEDecoder()
                done = False
                async for raw in response.http_response.aiter_raw():
                    if done:
                        continue  # drain to the end of the body so the connection is reused
                    for _event, data in decoder.feed(raw):
                        if data == b"[DONE]":
                            done = True
                            break
                        try:
                            chunk = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            raise UpstreamError(UPSTREAM, "upstream sent a malformed stream chunk") from None
                        for delta in chunk_deltas(chunk):
                            yield delta
        except (openai.APIError, OSError, httpx.HTTPError) as exc:
            raise sdk_error(exc, self.config, openai.APITimeoutError, openai.APIStatusError) from None

    async def aclose(self) -> None:
        await self._client.close()
