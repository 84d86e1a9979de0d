"""The providers in-process: request bodies built from a ChatRequest for both wire formats, and raw SSE
bytes parsed into deltas through the real provider code (official SDK, our decoder) over an in-memory
transport. No sockets: `sdk_http_client` (the function the providers get their HTTP client from) is
swapped for an httpx2 client on a `MockTransport` that records the request and replays scripted bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import orjson
import pytest

from backstream.api_models import ChatRequest, ThinkingDisabled, ThinkingEffort, ThinkingEnabled
from backstream.config import ModelConfig
from backstream.providers import UpstreamError, anthropic, openai
from backstream.providers.base import SSEDecoder, parse_retry_after, status_error

USER = [{"role": "user", "content": "hi"}]
TOOL = {
    "name": "weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OTHER = {"name": "news", "input_schema": {"type": "object"}}
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def chat(**over: Any) -> ChatRequest:
    return ChatRequest.model_validate({"messages": USER, **over})


def oa_config(**kw: Any) -> ModelConfig:
    return ModelConfig(
        **{
            "name": "gpt",
            "provider": "openai",
            "model": "gpt-up",
            "base_url": "http://up.test/v1",
            "max_tokens": 333,
            **kw,
        }
    )


def oa_body(request: ChatRequest, **config: Any) -> tuple[dict[str, Any], list[str]]:
    warnings: list[str] = []
    cfg = oa_config(**config)
    return openai.build_payload(cfg, request, warnings, extra_sampling=cfg.extra_sampling), warnings


def an_body(request: ChatRequest, max_tokens: int = 333) -> tuple[dict[str, Any], list[str]]:
    warnings: list[str] = []
    return anthropic.build_payload("claude-up", max_tokens, request, warnings), warnings


# --- OpenAI-compatible request bodies -----------------------------------------------------------


def test_openai_minimal_body() -> None:
    body, warnings = oa_body(chat())
    assert body == {
        "model": "gpt-up",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 333,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert warnings == []
    assert oa_body(chat(max_tokens=12))[0]["max_tokens"] == 12


def test_openai_sampling_forwarded_and_extras_dropped_with_warnings() -> None:
    request = chat(
        temperature=0.3,
        top_p=0.8,
        seed=11,
        stop_sequences=["END"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        service_tier="flex",
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
    )
    body, warnings = oa_body(request)
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (0.3, 0.8, 11, ["END"])
    assert (body["presence_penalty"], body["frequency_penalty"], body["service_tier"]) == (0.5, -0.5, "flex")
    assert not {"top_k", "min_p", "repetition_penalty", "repeat_penalty"} & set(body)
    assert warnings == [
        f"{k} is not supported by provider openai and was dropped" for k in ("top_k", "min_p", "repetition_penalty")
    ]
    body, warnings = oa_body(request, extra_sampling=True)
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (5, 0.1, 1.2) and warnings == []
    body, _ = oa_body(request, provider="local", extra_sampling=True)
    assert body["repeat_penalty"] == 1.2 and "repetition_penalty" not in body, "llama.cpp's name for it"


def test_openai_anthropic_only_fields_are_dropped_with_warnings() -> None:
    request = chat(
        inference_geo="eu",
        container="c1",
        cache_control={"type": "ephemeral"},
        context_management={"edits": []},
        maximum_loaded_skills=2,
    )
    body, warnings = oa_body(request)
    for key in ("inference_geo", "container", "cache_control", "context_management", "maximum_loaded_skills"):
        assert key not in body
    for key in ("inference_geo", "container", "cache_control"):
        assert f"{key} is not supported by provider openai and was dropped" in warnings
    # The gateway applies these itself (context window, skill tools): not the provider's to drop.
    assert not [w for w in warnings if "context_management" in w or "maximum_loaded_skills" in w]


@pytest.mark.parametrize(
    ("choice", "openai_choice", "anthropic_choice"),
    [
        ({"type": "auto"}, "auto", {"type": "auto"}),
        ({"type": "any"}, "required", {"type": "any"}),
        ({"type": "none"}, "none", {"type": "none"}),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
            {"type": "tool", "name": "weather"},
        ),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            "auto",
            {"type": "auto", "disable_parallel_tool_use": True},
        ),
    ],
)
def test_tool_choice_mapping(choice: dict[str, Any], openai_choice: Any, anthropic_choice: Any) -> None:
    request = chat(tools=[TOOL, OTHER], tool_choice=choice)
    sent, _ = oa_body(request)
    assert sent["tool_choice"] == openai_choice
    assert sent.get("parallel_tool_calls", True) is (not choice.get("disable_parallel_tool_use", False))
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather for a city", "parameters": TOOL["input_schema"]},
        },
        {"type": "function", "function": {"name": "news", "description": "", "parameters": {"type": "object"}}},
    ]
    sent, _ = an_body(request)
    assert sent["tool_choice"] == anthropic_choice
    assert sent["tools"] == [TOOL, OTHER]


def test_no_tools_no_tool_choice() -> None:
    assert "tools" not in oa_body(chat())[0] and "tool_choice" not in oa_body(chat())[0]
    assert "tools" not in an_body(chat())[0] and "tool_choice" not in an_body(chat())[0]


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        (ThinkingEffort(enabled=True, effort="low"), "low"),
        (ThinkingEffort(enabled=True), "medium"),
        (ThinkingEffort(enabled=False, effort="high"), None),
        (ThinkingEnabled(type="enabled", budget_tokens=1024), "low"),
        (ThinkingEnabled(type="enabled", budget_tokens=2048), "medium"),
        (ThinkingEnabled(type="enabled", budget_tokens=8191), "medium"),
        (ThinkingEnabled(type="enabled", budget_tokens=8192), "high"),
        (ThinkingDisabled(type="disabled"), None),
        (None, None),
    ],
)
def test_openai_thinking_maps_to_reasoning_effort(thinking: Any, effort: str | None) -> None:
    assert openai.effort_for(thinking) == effort
    body, _ = oa_body(chat(thinking=thinking.model_dump() if thinking is not None else None))
    assert body.get("reasoning_effort") == effort


def test_openai_structured_output_and_user() -> None:
    body, _ = oa_body(
        chat(output_config={"format": {"type": "json_schema", "schema": SCHEMA}}, metadata={"user_id": "u1", "x": "y"})
    )
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    assert body["user"] == "u1"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    body, _ = oa_body(chat(response_format=fmt))
    assert body["response_format"]["json_schema"] == {"name": "person", "schema": SCHEMA}
    body, _ = oa_body(
        chat(output_config={"format": {"type": "json_schema", "schema": SCHEMA, "name": "n", "strict": True}})
    )
    assert body["response_format"]["json_schema"] == {"name": "n", "schema": SCHEMA, "strict": True}
    body, _ = oa_body(chat(response_format={"type": "json_object"}))
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert "response_format" not in oa_body(chat(response_format={"type": "text"}))[0]


@pytest.mark.parametrize(
    "system",
    [
        "be brief",
        ["be brief", "be kind"],
        {"text": "be brief"},
        [{"text": "be brief"}, {"text": "be kind", "citations": []}],
        [{"type": "text", "text": "be brief"}],
    ],
    ids=["str", "list-str", "object", "list-object", "anthropic-blocks"],
)
def test_system_forms_become_one_system_message(system: Any) -> None:
    sent = oa_body(chat(system=system))[0]["messages"]
    expected = "be brief\n\nbe kind" if isinstance(system, list) and len(system) == 2 else "be brief"
    assert sent == [{"role": "system", "content": expected}, {"role": "user", "content": "hi"}]
    blocks = an_body(chat(system=system))[0]["system"]
    assert [b["text"] for b in blocks] == expected.split("\n\n") and all(b["type"] == "text" for b in blocks)


def test_system_role_messages_fold_into_the_system_prompt() -> None:
    request = chat(system=None, messages=[{"role": "system", "content": "rules"}, *USER])
    assert oa_body(request)[0]["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "hi"},
    ]
    assert an_body(request)[0]["system"] == [{"type": "text", "text": "rules"}]
    assert an_body(request)[0]["messages"] == [{"role": "user", "content": "hi"}]


CALL = {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}
ROUND_TRIP = [
    *USER,
    {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, CALL]},
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
            {"type": "text", "text": "and?"},
        ],
    },
]


def test_openai_tool_round_trip_messages() -> None:
    sent = oa_body(chat(messages=ROUND_TRIP, tools=[TOOL], tool_choice={"type": "tool", "name": "weather"}))[0]
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}
        ],
    }
    assert sent["messages"][2:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "and?"},
    ]
    error_result = [
        *ROUND_TRIP[:2],
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "is_error": True,
                    "content": [{"type": "text", "text": "no network"}],
                }
            ],
        },
    ]
    assert oa_body(chat(messages=error_result))[0]["messages"][2] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "Error: no network",
    }
    only_call = [*USER, {"role": "assistant", "content": [CALL]}]
    assert oa_body(chat(messages=only_call))[0]["messages"][1]["content"] is None


def test_openai_user_parts_images_and_documents() -> None:
    content = [
        {"type": "text", "text": "look:"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
        {"type": "document", "source": {"type": "text", "data": "doc text"}},
        {
            "type": "document",
            "title": "r.pdf",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"},
        },
        {"type": "document", "source": {"type": "url", "url": "https://example.com/d.pdf"}},
    ]
    parts = oa_body(chat(messages=[{"role": "user", "content": content}]))[0]["messages"][0]["content"]
    assert parts == [
        {"type": "text", "text": "look:"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
        {"type": "text", "text": "doc text"},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBER", "filename": "r.pdf"}},
        {"type": "text", "text": "[document: https://example.com/d.pdf]"},
    ]
    text_only = [{"type": "text", "text": "a"}, {"type": "document", "source": {"type": "text", "data": "b"}}]
    assert oa_body(chat(messages=[{"role": "user", "content": text_only}]))[0]["messages"] == [
        {"role": "user", "content": "ab"}
    ]


# --- Anthropic request bodies -------------------------------------------------------------------


def test_anthropic_minimal_body_and_round_trip_messages() -> None:
    body, warnings = an_body(chat())
    assert (
        body == {"model": "claude-up", "max_tokens": 333, "messages": [{"role": "user", "content": "hi"}]}
        and warnings == []
    )
    messages = an_body(chat(messages=ROUND_TRIP))[0]["messages"]
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, CALL]}
    assert messages[2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "call_1",
        "content": "sunny",
        "is_error": False,
    }


def test_anthropic_sampling_and_dropped_fields() -> None:
    request = chat(
        temperature=1.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        seed=7,
        maximum_loaded_skills=2,
        stop_sequences=["END"],
    )
    body, warnings = an_body(request)
    assert (body["temperature"], body["top_p"], body["top_k"], body["stop_sequences"]) == (1.0, 0.9, 40, ["END"])
    assert warnings[0] == "temperature above 1 is not supported by provider anthropic and was lowered to 1"
    dropped = ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")
    assert warnings[1:] == [f"{k} is not supported by provider anthropic and was dropped" for k in dropped]
    assert not set(dropped) & set(body) and "maximum_loaded_skills" not in body  # the gateway's (skill tools)
    assert an_body(chat(temperature=0.5))[0]["temperature"] == 0.5 and an_body(chat(temperature=0.5))[1] == []


@pytest.mark.parametrize(
    ("thinking", "max_tokens", "expected", "sent_max"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, 4096, {"type": "enabled", "budget_tokens": 1024}, 4096),
        ({"type": "enabled", "budget_tokens": 2000}, 1000, {"type": "enabled", "budget_tokens": 2000}, 3000),
        ({"enabled": True, "effort": "low"}, 8000, {"type": "enabled", "budget_tokens": 1024}, 8000),
        ({"enabled": True, "effort": "medium"}, 8000, {"type": "enabled", "budget_tokens": 4096}, 8000),
        ({"enabled": True, "effort": "high"}, 8000, {"type": "enabled", "budget_tokens": 16384}, 24384),
        ({"enabled": False}, 8000, None, 8000),
        ({"type": "disabled"}, 8000, None, 8000),
    ],
)
def test_anthropic_thinking_mapping(
    thinking: dict[str, Any], max_tokens: int, expected: dict[str, Any] | None, sent_max: int
) -> None:
    body, _ = an_body(chat(thinking=thinking, max_tokens=max_tokens))
    assert body.get("thinking") == expected
    assert body["max_tokens"] == sent_max, "max_tokens must exceed the thinking budget"


def test_anthropic_structured_output_metadata_cache_and_pass_through() -> None:
    request = chat(
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
        metadata={"user_id": "u1", "other": "dropped"},
        cache_control={"type": "ephemeral", "ttl": "1h"},
        service_tier="auto",
        inference_geo="eu",
        container="c1",
        context_management={"edits": []},
        system=[{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
    )
    body, warnings = an_body(request)
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert body["metadata"] == {"user_id": "u1"}
    assert body["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert (body["service_tier"], body["inference_geo"], body["container"], body["context_management"]) == (
        "auto",
        "eu",
        "c1",
        {"edits": []},
    )
    assert body["system"] == [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}]
    assert warnings == []


# --- the wire: scripted upstream bytes through the real providers -------------------------------


@dataclass
class Upstream:
    """What the in-memory transport answers, and what it saw."""

    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "text/event-stream"})
    requests: list[httpx2.Request] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    closed: bool = False

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        self.bodies.append(orjson.loads(request.content))
        if self.status != 200:
            return httpx2.Response(
                self.status, headers=self.headers, json={"error": {"type": "x", "message": "scripted failure"}}
            )
        return httpx2.Response(200, headers=self.headers, stream=_Body(self))


class _Body(httpx2.AsyncByteStream):
    """The response body: the scripted chunks, one read each; records how far it was read and its close."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.upstream.chunks:
            self.upstream.sent += 1
            yield chunk

    async def aclose(self) -> None:
        self.upstream.closed = True


@pytest.fixture()
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    up = Upstream()

    def client(timeout: httpx2.Timeout) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(transport=httpx2.MockTransport(up.handle), timeout=timeout)

    monkeypatch.setattr(openai, "sdk_http_client", client)
    monkeypatch.setattr(anthropic, "sdk_http_client", client)
    yield up


def split(raw: bytes, size: int) -> list[bytes]:
    """Chunks of `size` bytes: events and lines cut anywhere, as the network may."""
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def sse(*events: dict[str, Any] | str, named: bool = False, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    out = []
    for e in events:
        if isinstance(e, str):
            out.append(f"data: {e}{nl}{nl}")
        elif named:
            out.append(f"event: {e['type']}{nl}data: {orjson.dumps(e).decode()}{nl}{nl}")
        else:
            out.append(f"data: {orjson.dumps(e).decode()}{nl}{nl}")
    return "".join(out).encode()


async def deltas_of(provider: Any, request: ChatRequest, warnings: list[str] | None = None) -> list[tuple[Any, ...]]:
    try:
        return [d async for d in provider.stream(request, warnings if warnings is not None else [])]
    finally:
        await provider.aclose()


def oa_chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None, index: int = 0
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-up",
        "choices": [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


OPENAI_STREAM = sse(
    oa_chunk({"role": "assistant", "content": ""}),
    oa_chunk({"reasoning_content": "Let me "}),
    oa_chunk({"reasoning": "think."}),
    oa_chunk({"content": "Hel"}),
    oa_chunk({"content": "lo"}),
    oa_chunk({"content": "ignored"}, index=1),
    oa_chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}
            ]
        }
    ),
    oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    oa_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    oa_chunk({}, finish="tool_calls"),
    oa_chunk(
        usage={
            "prompt_tokens": 12,
            "completion_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    ),
    "[DONE]",
)
OPENAI_DELTAS = [
    ("thinking", "Let me "),
    ("thinking", "think."),
    ("text", "Hel"),
    ("text", "lo"),
    ("tool_start", 0, "call_a", "weather"),
    ("tool_delta", 0, '{"city": '),
    ("tool_delta", 0, '"Paris"}'),
    ("finish", "ToolUse"),
    ("usage", {"prompt_tokens": 12, "completion_tokens": 9, "cache_read_input_tokens": 4, "thought_tokens": 2}),
]


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
async def test_openai_stream_parsed_into_deltas(upstream: Upstream, size: int) -> None:
    upstream.chunks = split(OPENAI_STREAM, size)
    request = chat(tools=[TOOL], top_k=3)
    warnings: list[str] = []
    assert await deltas_of(openai.OpenAIProvider(oa_config()), request, warnings) == OPENAI_DELTAS
    sent = upstream.requests[0]
    assert sent.method == "POST" and str(sent.url) == "http://up.test/v1/chat/completions"
    assert upstream.bodies[0] == oa_body(request)[0], "the built body goes upstream as it is"
    assert warnings == ["top_k is not supported by provider openai and was dropped"]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_model_whose_key_variable_is_unset_never_calls_upstream(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.delenv("TEST_UNSET_KEY", raising=False)
    config = (oa_config if kind == "openai" else an_config)(api_key_env="TEST_UNSET_KEY")
    provider = openai.OpenAIProvider(config) if kind == "openai" else anthropic.AnthropicProvider(config)
    with pytest.raises(UpstreamError) as caught:
        await deltas_of(provider, chat())
    assert caught.value.type == "model_unavailable" and "TEST_UNSET_KEY" in caught.value.message
    assert not caught.value.retryable and upstream.requests == []


async def test_openai_api_key_from_the_environment(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_OA_KEY", "sk-test-123")
    upstream.chunks = [sse(oa_chunk({"content": "x"}), "[DONE]")]
    await deltas_of(openai.OpenAIProvider(oa_config(api_key_env="TEST_OA_KEY")), chat())
    assert upstream.requests[0].headers["authorization"] == "Bearer sk-test-123"


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("stop", "Stop"),
        ("length", "Length"),
        ("tool_calls", "ToolUse"),
        ("function_call", "ToolUse"),
        ("content_filter", "Stop"),
        ("weird", "Stop"),
    ],
)
def test_openai_finish_reasons(reason: str, finish: str) -> None:
    assert openai.chunk_deltas(oa_chunk({}, finish=reason)) == [("finish", finish)]


async def test_openai_stream_ends_at_done_and_tolerates_crlf_and_comments(upstream: Upstream) -> None:
    raw = (
        b": keep-alive comment\r\n\r\n"
        + sse(oa_chunk({"content": "a"}), "[DONE]", crlf=True)
        + sse(oa_chunk({"content": "after done"}))
    )
    upstream.chunks = split(raw, 5)
    assert await deltas_of(openai.OpenAIProvider(oa_config()), chat()) == [("text", "a")]
    assert upstream.sent == len(upstream.chunks), "the body is drained after [DONE] so the connection can be reused"
    assert upstream.closed


async def test_openai_error_chunk_becomes_an_error_delta(upstream: Upstream) -> None:
    upstream.chunks = [sse(oa_chunk({"content": "a"}), {"error": {"message": "model crashed"}}, {"error": "plain"})]
    assert await deltas_of(openai.OpenAIProvider(oa_config()), chat()) == [
        ("text", "a"),
        ("error", "upstream_error", "model crashed"),
        ("error", "upstream_error", "plain"),
    ]


async def test_openai_malformed_chunk_is_an_upstream_error(upstream: Upstream) -> None:
    upstream.chunks = [sse(oa_chunk({"content": "a"})), b'data: {"choices": [\n\n']
    got: list[Any] = []
    with pytest.raises(UpstreamError) as caught:
        async for d in openai.OpenAIProvider(oa_config()).stream(chat(), []):
            got.append(d)
    assert got == [("text", "a")]
    assert caught.value.type == "upstream_error" and "malformed" in caught.value.message and not caught.value.retryable


@pytest.mark.parametrize(
    ("status", "headers", "etype", "retryable", "retry_after"),
    [
        (429, {"retry-after": "3"}, "overloaded_error", True, 3.0),
        (429, {"retry-after-ms": "250"}, "overloaded_error", True, 0.25),
        (503, {}, "overloaded_error", True, None),
        (500, {}, "upstream_error", True, None),
        (408, {}, "upstream_error", True, None),
        (400, {}, "upstream_error", False, None),
        (401, {}, "upstream_error", False, None),
    ],
)
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_http_errors_map_to_upstream_errors(
    upstream: Upstream,
    kind: str,
    status: int,
    headers: dict[str, str],
    etype: str,
    retryable: bool,
    retry_after: float | None,
) -> None:
    upstream.status, upstream.headers = status, {"content-type": "application/json", **headers}
    provider = openai.OpenAIProvider(oa_config()) if kind == "openai" else anthropic.AnthropicProvider(an_config())
    with pytest.raises(UpstreamError) as caught:
        await deltas_of(provider, chat())
    err = caught.value
    assert (err.type, err.status, err.retryable, err.retry_after) == (etype, status, retryable, retry_after)
    assert "scripted failure" in err.message
    assert len(upstream.requests) == 1, "the SDK's own retries are off: retries are the run loop's"


async def test_a_transport_failure_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused")

    monkeypatch.setattr(
        openai, "sdk_http_client", lambda timeout: httpx2.AsyncClient(transport=httpx2.MockTransport(refuse))
    )
    with pytest.raises(UpstreamError) as caught:
        await deltas_of(openai.OpenAIProvider(oa_config()), chat())
    assert (
        caught.value.type == "upstream_error" and caught.value.retryable and "connection failed" in caught.value.message
    )


async def test_a_read_timeout_is_a_timeout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("timed out")

    monkeypatch.setattr(
        anthropic, "sdk_http_client", lambda timeout: httpx2.AsyncClient(transport=httpx2.MockTransport(slow))
    )
    with pytest.raises(UpstreamError) as caught:
        await deltas_of(anthropic.AnthropicProvider(an_config(timeout_s=7)), chat())
    assert caught.value.type == "timeout_error" and caught.value.retryable and "7 s" in caught.value.message


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_closing_the_stream_early_closes_the_upstream_response(upstream: Upstream, kind: str) -> None:
    if kind == "openai":
        upstream.chunks = [sse(oa_chunk({"content": f"t{i}"})) for i in range(50)]
        provider: Any = openai.OpenAIProvider(oa_config())
    else:
        upstream.chunks = [sse(*ANTHROPIC_EVENTS[:3], named=True)] + [
            sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"t{i}"}},
                named=True,
            )
            for i in range(50)
        ]
        provider = anthropic.AnthropicProvider(an_config())
    stream = provider.stream(chat(), [])
    assert (await anext(stream))[0] == "text"
    await stream.aclose()
    assert upstream.closed and upstream.sent < 10
    await provider.aclose()


# --- Anthropic stream ---------------------------------------------------------------------------


def an_config(**kw: Any) -> ModelConfig:
    return ModelConfig(
        **{
            "name": "claude",
            "provider": "anthropic",
            "model": "claude-up",
            "base_url": "http://up.test",
            "max_tokens": 333,
            **kw,
        }
    )


ANTHROPIC_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-up",
            "content": [],
            "usage": {
                "input_tokens": 100,
                "output_tokens": 1,
                "cache_creation_input_tokens": 30,
                "cache_read_input_tokens": 60,
            },
        },
    },
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
]
ANTHROPIC_STREAM = sse(
    {"type": "message_start", "message": ANTHROPIC_EVENTS[0]["message"]},
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think."}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQB"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking"}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}},
    },
    {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}},
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 42, "output_tokens_details": {"thinking_tokens": 17}},
    },
    {"type": "message_stop"},
    named=True,
)
ANTHROPIC_DELTAS = [
    ("thinking", "Let me think."),
    ("signature", "EqQB"),
    ("text", "Checking"),
    ("tool_start", 2, "toolu_1", "weather"),
    ("tool_delta", 2, '{"city": "Paris"}'),
    (
        "usage",
        {
            "prompt_tokens": 100,
            "completion_tokens": 42,
            "cache_write_input_tokens": 30,
            "cache_read_input_tokens": 60,
            "thought_tokens": 17,
        },
    ),
    ("finish", "ToolUse"),
]


@pytest.mark.parametrize("size", [1, 13, 1 << 20])
async def test_anthropic_stream_parsed_into_deltas(upstream: Upstream, size: int) -> None:
    upstream.chunks = split(ANTHROPIC_STREAM, size)
    request = chat(tools=[TOOL], thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2048)
    assert await deltas_of(anthropic.AnthropicProvider(an_config()), request) == ANTHROPIC_DELTAS
    sent = upstream.requests[0]
    assert str(sent.url) == "http://up.test/v1/messages"
    assert upstream.bodies[0] == {**an_body(request)[0], "stream": True}


async def test_anthropic_stream_ends_at_message_stop(upstream: Upstream) -> None:
    after = sse(
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "after message_stop"}},
        named=True,
    )
    upstream.chunks = [ANTHROPIC_STREAM + after]
    assert await deltas_of(anthropic.AnthropicProvider(an_config()), chat()) == ANTHROPIC_DELTAS


async def test_anthropic_stream_ends_at_message_stop_in_an_earlier_chunk(upstream: Upstream) -> None:
    after = sse(
        {"type": "content_block_delta", "index": 3, "delta": {"type": "text_delta", "text": "after message_stop"}},
        named=True,
    )
    upstream.chunks = [ANTHROPIC_STREAM, after]
    assert await deltas_of(anthropic.AnthropicProvider(an_config()), chat()) == ANTHROPIC_DELTAS


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "Stop"),
        ("max_tokens", "Length"),
        ("stop_sequence", "StopSequence"),
        ("tool_use", "ToolUse"),
        ("pause_turn", "Stop"),
        ("refusal", "Stop"),
        ("model_context_window_exceeded", "Length"),
        ("novel", "Stop"),
    ],
)
def test_anthropic_stop_reasons(reason: str, finish: str) -> None:
    parser = anthropic.AnthropicStreamParser()
    assert parser.deltas(
        b"message_delta", {"type": "message_delta", "delta": {"stop_reason": reason}, "usage": {"output_tokens": 3}}
    ) == [("usage", {"completion_tokens": 3}), ("finish", finish)]


def test_anthropic_usage_merges_message_start_and_message_delta() -> None:
    parser = anthropic.AnthropicStreamParser()
    assert parser.deltas(b"message_start", ANTHROPIC_EVENTS[0]) == []
    out = parser.deltas(
        b"message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 9, "input_tokens": 120}}
    )
    assert out == [
        (
            "usage",
            {
                "prompt_tokens": 120,
                "completion_tokens": 9,
                "cache_write_input_tokens": 30,
                "cache_read_input_tokens": 60,
            },
        )
    ]


def test_anthropic_event_type_from_the_sse_event_name() -> None:
    parser = anthropic.AnthropicStreamParser()
    assert parser.deltas(b"content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "x"}}) == [
        ("text", "x")
    ]
    assert parser.deltas(
        b"content_block_start", {"index": 1, "content_block": {"type": "server_tool_use", "id": "s1", "name": "web"}}
    ) == [("tool_start", 1, "s1", "web")]
    assert parser.deltas(b"content_block_delta", {"index": 0, "delta": {"type": "citations_delta"}}) == []


@pytest.mark.parametrize(
    ("err_type", "ours"), [("overloaded_error", "overloaded_error"), ("api_error", "upstream_error")]
)
async def test_anthropic_error_event(upstream: Upstream, err_type: str, ours: str) -> None:
    upstream.chunks = [
        sse(
            *ANTHROPIC_EVENTS,
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "a"}},
            {"type": "error", "error": {"type": err_type, "message": "Overloaded"}},
            named=True,
        )
    ]
    assert await deltas_of(anthropic.AnthropicProvider(an_config()), chat()) == [
        ("text", "a"),
        ("error", ours, "Overloaded"),
    ]


async def test_anthropic_malformed_event_is_an_upstream_error(upstream: Upstream) -> None:
    upstream.chunks = [sse(*ANTHROPIC_EVENTS, named=True), b"event: content_block_delta\ndata: {oops\n\n"]
    with pytest.raises(UpstreamError) as caught:
        await deltas_of(anthropic.AnthropicProvider(an_config()), chat())
    assert "malformed" in caught.value.message


# --- the SSE decoder and the small helpers ------------------------------------------------------


def test_sse_decoder_fields_and_line_endings() -> None:
    raw = (
        b'event: a\r\ndata: one\r\ndata:two\r\n\r\n: comment\n\nid: 7\nretry: 10\n\ndata: {"x": 1}\n\nevent: empty\n\n'
    )
    for size in (1, 2, 3, len(raw)):
        decoder = SSEDecoder()
        out = [e for chunk in split(raw, size) for e in decoder.feed(chunk)]
        assert out == [(b"a", b"one\ntwo"), (b"", b'{"x": 1}')], size


def test_sse_decoder_holds_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert (
        decoder.feed(b"data: par") == []
        and decoder.feed(b"tial\n") == []
        and decoder.feed(b"\n") == [(b"", b"partial")]
    )


def test_parse_retry_after_and_status_error() -> None:
    assert parse_retry_after(httpx2.Headers({"retry-after": "2"})) == 2.0
    assert parse_retry_after(httpx2.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert parse_retry_after(httpx2.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert parse_retry_after(None) is None
    assert status_error(529, "x").type == "overloaded_error" and status_error(529, "x").retryable
    assert not status_error(404, "x").retryable


def test_anthropic_citations_pass_through_onto_the_text_block() -> None:
    """citations_delta from Anthropic lands on the text block it belongs to (and its text_complete event)."""
    from backstream.blocks import StepAssembler
    from backstream.events import Event

    citation = {"type": "char_location", "cited_text": "Kourou", "document_index": 0, "start_char_index": 4}
    parser = anthropic.AnthropicStreamParser()
    delta = {"index": 0, "delta": {"type": "citations_delta", "citation": citation}}
    assert parser.deltas(b"content_block_delta", delta) == [("citation", citation)]
    seq = iter(range(1, 100))
    assembler = StepAssembler(lambda type, **f: Event.build(next(seq), type, "msg_1", **f), "msg_1")
    events = [*assembler.apply(("text", "From Kourou.")), *assembler.apply(("citation", citation))]
    events += assembler.close()
    assert events[-1].type == "text_complete" and events[-1].fields["citations"] == [citation]
    assert assembler.result().blocks[0].citations == [citation]


def test_anthropic_payload_drops_the_gateways_own_citations() -> None:
    ours = {"type": "search_result_location", "source_index": 1, "document_index": 0, "cited_text": "x"}
    theirs = {"type": "char_location", "cited_text": "y", "document_index": 0, "start_char_index": 0}
    request = chat(
        messages=[
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "a [1]", "citations": [ours, theirs]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "b [1]", "citations": [ours]}]},
            {"role": "user", "content": "more"},
        ]
    )
    body, _ = an_body(request)
    assert body["messages"][1]["content"][0]["citations"] == [theirs]
    assert "citations" not in body["messages"][2]["content"][0]
