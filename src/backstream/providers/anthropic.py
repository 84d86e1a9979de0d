"""Anthropic's Messages API through the official SDK, body parsed lean (see openai.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

import anthropic
import httpx2 as httpx  # the transport both official SDKs are built on
import orjson

from .. import tracing
from ..api_models import ChatRequest, Message, ThinkingEffort, ThinkingEnabled
from .base import OVERLOADED, UPSTREAM, Delta, Provider, SSEDecoder, UpstreamError, sdk_error, timeout_for
from .transport import sdk_http_client

_FINISH = {
    "end_turn": "Stop",
    "max_tokens": "Length",
    "stop_sequence": "StopSequence",
    "tool_use": "ToolUse",
    "pause_turn": "Stop",
    "refusal": "Stop",
    "model_context_window_exceeded": "Length",
}
_EFFORT_BUDGET = {"low": 1024, "medium": 4096, "high": 16384}
# Request fields Anthropic understands that are passed on unchanged when set.
_PASS_THROUGH = ("service_tier", "inference_geo")
CONTEXT_MANAGEMENT_BETA = "context-management-2025-06-27"  # Anthropic reads context_management only with it


def build_payload(model: str, default_max_tokens: int, request: ChatRequest, warnings: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens or default_max_tokens,
        "messages": [_upstream_message(m) for m in request.messages],
    }
    if request.system:
        body["system"] = [
            {"type": "text", "text": s.text, **({"cache_control": s.cache_control} if s.cache_control else {})}
            for s in request.system
        ]
    _add_sampling(body, request, warnings)
    if request.stop_sequences:
        body["stop_sequences"] = request.stop_sequences
    if request.tools:
        body["tools"] = [t.model_dump(exclude_none=True) for t in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice.model_dump(exclude_none=True)
    _add_thinking(body, request, default_max_tokens)
    fmt = request.output_format
    if fmt is not None:
        body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.schema_}}
    if request.metadata and request.metadata.get("user_id"):
        body["metadata"] = {"user_id": request.metadata["user_id"]}
    if request.cache_control is not None:
        body["cache_control"] = request.cache_control.model_dump(exclude_none=True)
    for key in _PASS_THROUGH:
        if getattr(request, key) is not None:
            body[key] = getattr(request, key)
    # A container used by code_execution_v1 is the gateway's sandbox directory, not an Anthropic container.
    if request.container is not None and not request.uses_builtin("code_execution_v1"):
        body["container"] = request.container
    # Anthropic's own edits shape goes on (the gateway has trimmed already); {"strategy": ...} is the gateway's own.
    if request.context_management is not None and "edits" in request.context_management:
        body["context_management"] = request.context_management
    return body


def _upstream_message(message: Message) -> dict[str, Any]:
    """A message as Anthropic takes it: the gateway's own citations (built-in search) are not Anthropic's to check."""
    data = message.model_dump(mode="json", exclude_none=True, by_alias=True)
    for block in data["content"] if isinstance(data["content"], list) else ():
        if block.get("type") == "text" and block.get("citations"):
            kept = [c for c in block["citations"] if "source_index" not in c]
            if kept:
                block["citations"] = kept
            else:
                del block["citations"]
    return data


def _headers(body: dict[str, Any]) -> dict[str, str] | None:
    headers = tracing.headers()
    if "context_management" in body:
        headers = {**(headers or {}), "anthropic-beta": CONTEXT_MANAGEMENT_BETA}
    return headers


def _add_sampling(body: dict[str, Any], request: ChatRequest, warnings: list[str]) -> None:
    if request.temperature is not None:
        if request.temperature > 1:
            warnings.append("temperature above 1 is not supported by provider anthropic and was lowered to 1")
        body["temperature"] = min(request.temperature, 1.0)
    for key in ("top_p", "top_k"):
        if getattr(request, key) is not None:
            body[key] = getattr(request, key)
    for key in (
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
    ):
        if getattr(request, key) is not None:
            warnings.append(f"{key} is not supported by provider anthropic and was dropped")


def _add_thinking(body: dict[str, Any], request: ChatRequest, default_max_tokens: int) -> None:
    thinking = request.thinking
    if isinstance(thinking, ThinkingEnabled):
        body["thinking"] = {"type": "enabled", "budget_tokens": thinking.budget_tokens}
    elif isinstance(thinking, ThinkingEffort) and thinking.enabled:
        body["thinking"] = {"type": "enabled", "budget_tokens": _EFFORT_BUDGET[thinking.effort]}
    if "thinking" in body and body["max_tokens"] <= body["thinking"]["budget_tokens"]:
        body["max_tokens"] = body["thinking"]["budget_tokens"] + (request.max_tokens or default_max_tokens)


class AnthropicStreamParser:
    """Anthropic SSE events -> deltas; keeps the usage that message_start and message_delta split."""

    __slots__ = ("usage",)

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}

    def deltas(self, kind: bytes, event: dict[str, Any]) -> list[Delta]:
        t = event.get("type") or kind.decode()
        if t == "content_block_delta":
            return _block_delta(event)
        if t == "content_block_start":
            block = event["content_block"]
            if block.get("type") in ("tool_use", "server_tool_use"):
                return [("tool_start", event["index"], block.get("id"), block.get("name"))]
            return []
        if t == "message_start":
            u = (event.get("message") or {}).get("usage") or {}
            self.usage = {
                "prompt_tokens": u.get("input_tokens"),
                "completion_tokens": u.get("output_tokens"),
                "cache_write_input_tokens": u.get("cache_creation_input_tokens"),
                "cache_read_input_tokens": u.get("cache_read_input_tokens"),
            }
            return []
        if t == "message_delta":
            out: list[Delta] = []
            u = event.get("usage") or {}
            for ours, theirs in (("completion_tokens", "output_tokens"), ("prompt_tokens", "input_tokens")):
                if u.get(theirs) is not None:
                    self.usage[ours] = u[theirs]
            thinking = (u.get("output_tokens_details") or {}).get("thinking_tokens")
            if thinking is not None:
                self.usage["thought_tokens"] = thinking
            out.append(("usage", dict(self.usage)))
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason:
                out.append(("finish", _FINISH.get(reason, "Stop")))
            return out
        if t == "error":
            err = event.get("error") or {}
            etype = OVERLOADED if err.get("type") == "overloaded_error" else UPSTREAM
            return [("error", etype, str(err.get("message") or "upstream error"))]
        return []


def _block_delta(event: dict[str, Any]) -> list[Delta]:
    d = event["delta"]
    dt = d.get("type")
    if dt == "text_delta":
        return [("text", d["text"])]
    if dt == "thinking_delta":
        return [("thinking", d["thinking"])]
    if dt == "input_json_delta":
        return [("tool_delta", event["index"], d["partial_json"])] if d.get("partial_json") else []
    if dt == "signature_delta":
        return [("signature", d["signature"])]
    if dt == "citations_delta":  # Anthropic's own citations (documents, search results) pass through
        return [("citation", d["citation"])] if isinstance(d.get("citation"), dict) else []
    return []


class AnthropicProvider(Provider):
    """Streams from the Anthropic Messages API."""

    name = "anthropic"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        api_key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or "none",
            base_url=config.base_url,
            max_retries=0,
            timeout=timeout_for(config),
            http_client=sdk_http_client(timeout_for(config)),
        )

    async def stream(self, request: ChatRequest, warnings: list[str]) -> AsyncGenerator[Delta, None]:
        body = build_payload(self.config.upstream_model, self.config.max_tokens, request, warnings)
        parser = AnthropicStreamParser()
        unavailable = self.unavailable()
        if unavailable is not None:  # never call upstream with a placeholder key
            raise unavailable
        try:
            # As in the openai provider: the validated body skips the SDK's per-field transform.
            async with self._client.messages.with_streaming_response.create(
                model=body["model"],
                max_tokens=body["max_tokens"],
                messages=[],
                stream=True,
                extra_body=body,
                extra_headers=_headers(body),
            ) as response:
                decoder = SSEDecoder()
                done = False
                async for raw in response.http_response.aiter_raw():
                    if done:
                        continue  # past message_stop: drain, so the connection can be reused
                    for kind, data in decoder.feed(raw):
                        if kind == b"message_stop":
                            done = True
                            break
                        try:
                            event = orjson.loads(data)
                        except orjson.JSONDecodeError:
                            raise UpstreamError(UPSTREAM, "upstream sent a malformed stream event") from None
                        for delta in parser.deltas(kind, event):
                            yield delta
        except (anthropic.APIError, OSError, httpx.HTTPError) as exc:
            raise sdk_error(exc, self.config, anthropic.APITimeoutError, anthropic.APIStatusError) from None

    async def aclose(self) -> None:
        await self._client.close()
