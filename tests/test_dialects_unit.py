"""The dialect adapters in-process: the official SDKs, unchanged, parse what they render.

No server and no store: a mock transport stands where the HTTP edge will be. It parses
each SDK request with the dialect (and validates the result as a native ChatRequest),
answers with a scripted run's canonical events rendered by the dialect, and keeps
background runs in a dict. The SDK clients run with strict response validation, so
every object and stream event is checked against the SDK's own models.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import openai
import orjson
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from backstream.dialects import anthropic as anth
from backstream.dialects import openai_chat as chat
from backstream.dialects import openai_responses as resp
from backstream.dialects.common import DialectError
from backstream.events import Event

try:  # the module names are being reshaped (issue 11)
    from backstream.api_models import ChatRequest
except ImportError:  # pragma: no cover
    from backstream.schema import ChatRequest  # type: ignore[no-redef]
try:
    from backstream.folding import MessageFolder
except ImportError:  # pragma: no cover
    from backstream.engine import MessageFolder  # type: ignore[no-redef]

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 7,
    "cache_write_input_tokens": None,
    "cache_read_input_tokens": 3,
    "thought_tokens": None,
}


# --- canonical runs -------------------------------------------------------------------------------


def canonical(
    message_id: str,
    steps: list[list[tuple[Any, ...]]],
    finish: str = "Stop",
    error: dict[str, str] | None = None,
    model: str = "fake",
) -> list[Event]:
    """A run's event log as the engine writes it. Blocks: ("text", [deltas]),
    ("thinking", [deltas], signature), ("tool", id, name, [fragments]), ("result", id, name, content)."""
    events: list[Event] = []

    def add(type: str, **fields: Any) -> None:
        events.append(Event.build(len(events) + 1, type, message_id, **fields))

    add("stream_start", model=model, provider="fake", metadata={"warnings": []})
    for n, blocks in enumerate(steps, 1):
        add("step_start", step=n)
        results = []
        for block in blocks:
            kind = block[0]
            if kind in ("text", "thinking"):
                add(f"{kind}_start")
                for d in block[1]:
                    add(f"{kind}_delta", delta=d)
                whole = "".join(block[1])
                if kind == "text":
                    add("text_complete", text=whole)
                else:
                    add("thinking_complete", thinking=whole, signature=block[2])
            elif kind == "tool":
                add("tool_call_start", tool_call_id=block[1], name=block[2])
                for d in block[3]:
                    add("tool_call_delta", tool_call_id=block[1], delta=d)
                add(
                    "tool_call_complete",
                    tool_call_id=block[1],
                    name=block[2],
                    input=orjson.loads("".join(block[3]) or "{}"),
                )
            else:
                results.append(block)
        step_finish = finish if n == len(steps) else "ToolUse"
        add("step_finish", step=n, finish_reason=step_finish, usage=USAGE)
        for _, call_id, name, content in results:
            add("tool_result", tool_call_id=call_id, name=name, content=content, is_error=False)
    fields: dict[str, Any] = {"finish_reason": finish, "usage": USAGE, "citations": None}
    if error:
        fields["error"] = error
    add("stream_end", **fields)
    return events


def fold(events: list[Event]) -> dict[str, Any]:
    folder = MessageFolder()
    for e in events:
        folder.feed(e)
    return folder.message(events[0].load()["message_id"])


def render(renderer: Any, events: list[Event]) -> bytes:
    return b"".join(renderer.feed(e) for e in events)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """Frames as {id?, event?, data}, with the `data:` JSON parsed (`[DONE]` kept as a string)."""
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            frame[key] = value
        frame["data"] = frame["data"] if frame["data"] == "[DONE]" else orjson.loads(frame["data"])
        out.append(frame)
    return out


# --- an in-process edge ------------------------------------------------------------------------------


class Edge:
    """What the HTTP edge does with the dialects, minus HTTP: enough for the SDKs to talk to."""

    def __init__(self) -> None:
        self.replies: list[tuple[list[list[tuple[Any, ...]]], str]] = []
        self.requests: list[dict[str, Any]] = []  # validated native requests
        self.runs: dict[str, tuple[list[Event], dict[str, Any]]] = {}
        self.count = 0

    def reply(self, *steps: list[tuple[Any, ...]], finish: str = "Stop") -> None:
        self.replies.append((list(steps), finish))

    def _run(self, prefix: str, native: dict[str, Any]) -> list[Event]:
        self.requests.append(ChatRequest.model_validate(native).model_dump(exclude_none=True, by_alias=True))
        steps, finish = self.replies.pop(0) if self.replies else ([[("text", ["Hello", ", world"])]], "Stop")
        self.count += 1
        return canonical(f"{prefix}_{self.count:04d}", steps, finish)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        body = orjson.loads(request.content) if request.content else {}
        try:
            if path == "/v1/messages":
                return self._anthropic(body)
            if path == "/v1/chat/completions":
                return self._chat(body)
            return self._responses(request, path, body)
        except DialectError as exc:
            error = chat.error_body if path != "/v1/messages" else anth.error_body
            return httpx2.Response(
                422, content=error("invalid_request_error", exc.message, "req_1", [{"field": exc.field}])
            )

    def _anthropic(self, body: dict[str, Any]) -> httpx2.Response:
        events = self._run("msg", anth.parse_request(body))
        if body.get("stream"):
            return _sse(render(anth.StreamRenderer(), events))
        return httpx2.Response(200, json=anth.message(fold(events)))

    def _chat(self, body: dict[str, Any]) -> httpx2.Response:
        params = chat.parse_request(body)
        events = self._run("msg", params.native)
        if params.stream:
            return _sse(render(chat.StreamRenderer(params.include_usage), events))
        return httpx2.Response(200, json=chat.completion(fold(events), created=1_700_000_000))

    def _responses(self, request: httpx2.Request, path: str, body: dict[str, Any]) -> httpx2.Response:
        parts = path.removeprefix("/v1/responses").strip("/").split("/")
        if parts == [""]:
            params = resp.parse_request(body)
            events = self._run("resp", params.native)
            rid = events[0].load()["message_id"]
            base = resp.response_base(
                self.requests[-1], rid, 1_700_000_000, params.native.get("model") or "fake", params.background
            )
            self.runs[rid] = (events, base)
            if params.stream:
                return _sse(render(resp.StreamRenderer(base), events))
            status = "queued" if params.background else resp.status_of("completed", events[-1].load()["finish_reason"])
            return httpx2.Response(
                200, json=resp.response_object(base, None if params.background else fold(events), status)
            )
        events, base = self.runs[parts[0]]
        if parts[1:] == ["cancel"]:
            self.runs[parts[0]] = (cancelled(events), base)
            return httpx2.Response(200, json=resp.response_object(base, fold(self.runs[parts[0]][0]), "cancelled"))
        query = request.url.params
        if query.get("stream") == "true":
            return _sse(render(resp.StreamRenderer(base, int(query.get("starting_after", -1))), events))
        return httpx2.Response(
            200,
            json=resp.response_object(
                base, fold(events), resp.status_of("completed", events[-1].load()["finish_reason"])
            ),
        )


def cancelled(events: list[Event]) -> list[Event]:
    """The log of a run cancelled after its first text delta."""
    cut = next(i for i, e in enumerate(events) if e.type == "text_delta") + 1
    last = Event.build(
        cut + 1, "stream_end", events[0].load()["message_id"], finish_reason="Cancelled", usage=USAGE, citations=None
    )
    return [*events[:cut], last]


def _sse(raw: bytes) -> httpx2.Response:
    return httpx2.Response(200, content=raw, headers={"content-type": "text/event-stream"})


@pytest.fixture
def edge() -> Edge:
    return Edge()


@pytest.fixture
def claude(edge: Edge) -> Iterator[anthropic.Anthropic]:
    http = httpx2.Client(transport=httpx2.MockTransport(edge.handle))
    with anthropic.Anthropic(
        api_key="k", base_url="http://edge", http_client=http, max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


@pytest.fixture
def oai(edge: Edge) -> Iterator[openai.OpenAI]:
    http = httpx2.Client(transport=httpx2.MockTransport(edge.handle))
    with openai.OpenAI(
        api_key="k", base_url="http://edge/v1", http_client=http, max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


HELLO = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


# --- Anthropic ---------------------------------------------------------------------------------------


def test_anthropic_create_answers_a_message_with_stop_reason_and_usage(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model="fake", max_tokens=32, messages=HELLO)
    assert message.content[0].type == "text" and message.content[0].text == "Hello, world"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens) == (
        12,
        7,
        3,
    )
    assert message.id.startswith("msg_") and message.model == "fake"


def test_anthropic_stream_helper_yields_text_and_the_same_final_message(
    claude: anthropic.Anthropic, edge: Edge
) -> None:
    edge.reply([("text", ["Hel", "lo", " there"])], finish="Length")
    with claude.messages.stream(model="fake", max_tokens=3, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 7 and final.usage.input_tokens == 12
    edge.reply([("text", ["Hel", "lo", " there"])], finish="Length")
    folded = claude.messages.create(model="fake", max_tokens=3, messages=HELLO)
    assert final.model_dump(exclude={"id"}) == folded.model_dump(exclude={"id"})


def test_anthropic_tool_use_round_trip(claude: anthropic.Anthropic, edge: Edge) -> None:
    tools = [{"name": "weather", "description": "Weather by city", "input_schema": WEATHER_TOOL}]
    edge.reply(
        [("text", ["Let me look."]), ("tool", "toolu_1", "weather", ['{"city"', ': "Paris"}'])], finish="ToolUse"
    )
    with claude.messages.stream(model="fake", max_tokens=64, messages=HELLO, tools=tools) as stream:
        events = [e.type for e in stream]
        first = stream.get_final_message()
    assert "input_json" in events
    assert first.stop_reason == "tool_use"
    call = first.content[1]
    assert call.type == "tool_use" and call.id == "toolu_1" and call.input == {"city": "Paris"}
    messages = [
        *HELLO,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
    ]
    second = claude.messages.create(
        model="fake", max_tokens=64, messages=messages, tools=[{**tools[0], "type": "custom"}]
    )
    assert second.stop_reason == "end_turn"
    sent = edge.requests[-1]
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "Sunny",
        "is_error": False,
    }
    assert sent["tools"][0]["name"] == "weather"  # type "custom" dropped


def test_anthropic_thinking_blocks_stream_with_their_signature(claude: anthropic.Anthropic, edge: Edge) -> None:
    edge.reply([("thinking", ["Let me ", "think."], "sig123"), ("text", ["42"])])
    with claude.messages.stream(
        model="fake", max_tokens=2048, messages=HELLO, thinking={"type": "enabled", "budget_tokens": 1024}
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    assert (
        final.content[0].type == "thinking"
        and final.content[0].thinking == "Let me think."
        and final.content[0].signature == "sig123"
    )
    assert final.content[1].type == "text" and final.content[1].text == "42"
    assert edge.requests[-1]["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_anthropic_adaptive_thinking_and_efforts_become_native_ones() -> None:
    native = anth.parse_request(
        {
            "messages": HELLO,
            "max_tokens": 5,
            "thinking": {"type": "adaptive"},
            "output_config": {"effort": "max"},
            "speed": "fast",
        }
    )
    assert native["thinking"] == {"enabled": True, "effort": "high"} and native["output_config"] == {"effort": "high"}
    ChatRequest.model_validate(native)
    with pytest.raises(DialectError) as info:
        anth.parse_request({"messages": HELLO, "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert info.value.field == "tools.0.type"


def test_anthropic_a_failed_run_ends_the_stream_with_an_error_event(claude: anthropic.Anthropic) -> None:
    events = canonical(
        "msg_E",
        [[("text", ["par"])]],
        finish="Error",
        error={"type": "upstream_error", "message": "the provider went away"},
    )
    frames = sse_events(render(anth.StreamRenderer(), events))
    assert frames[-1]["event"] == "error" and frames[-1]["data"] == {
        "type": "error",
        "error": {"type": "api_error", "message": "the provider went away"},
    }
    http = httpx2.Client(transport=httpx2.MockTransport(lambda r: _sse(render(anth.StreamRenderer(), events))))
    client = anthropic.Anthropic(api_key="k", base_url="http://edge", http_client=http, max_retries=0)
    with (
        pytest.raises(anthropic.APIStatusError, match="the provider went away"),
        client.messages.stream(model="fake", max_tokens=5, messages=HELLO) as stream,
    ):
        stream.until_done()


def test_anthropic_every_frame_is_a_stream_event_and_each_event_ends_with_its_id() -> None:
    events = canonical(
        "msg_V",
        [[("thinking", ["a"], None), ("text", ["b"]), ("tool", "t1", "weather", ['{"city": "X"}'])], [("text", ["c"])]],
        finish="Stop",
    )
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    renderer = anth.StreamRenderer()
    for event in events:
        out = renderer.feed(event)
        if not out:
            continue
        frames = sse_events(out)
        # One cursor per event, on its last frame: Last-Event-ID passes an event only once all of it arrived.
        assert frames[-1]["id"] == str(event.seq) and all("id" not in f for f in frames[:-1])
        for f in frames:
            if f["event"] != "ping":
                assert adapter.validate_python(f["data"]).type == f["event"]
    indexes = [
        f["data"]["index"]
        for f in sse_events(render(anth.StreamRenderer(), events))
        if f["event"] == "content_block_start"
    ]
    assert indexes == [0, 1, 2, 3]  # blocks of later steps continue the numbering


def test_anthropic_server_run_tools_show_as_mcp_tool_results(claude: anthropic.Anthropic, edge: Edge) -> None:
    edge.reply([("tool", "t1", "search", ['{"q": "x"}']), ("result", "t1", "search", "found it")], [("text", ["Done"])])
    # Only the beta client knows the MCP connector's blocks (and only it sends mcp_servers).
    message = claude.beta.messages.create(model="fake", max_tokens=16, messages=HELLO)
    assert [b.type for b in message.content] == ["tool_use", "mcp_tool_result", "text"]
    assert message.stop_reason == "end_turn"


def test_anthropic_error_body_has_anthropics_shape() -> None:
    body = orjson.loads(anth.error_body("conflict_error", "exists", "req_9", [{"field": "message_id"}]))
    assert body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "exists", "details": [{"field": "message_id"}]},
        "request_id": "req_9",
    }


def test_anthropic_resuming_after_any_event_sends_exactly_the_rest() -> None:
    events = canonical(
        "msg_R",
        [[("thinking", ["a", "b"], "s"), ("text", ["c", "d"]), ("tool", "t1", "f", ['{"x"', ":1}"])]],
        finish="ToolUse",
    )
    once = anth.StreamRenderer()
    whole = [once.feed(e) for e in events]
    for cursor in range(len(events) + 1):
        renderer = anth.StreamRenderer()
        for e in events[:cursor]:
            renderer.feed(e, emit=False)
        assert render(renderer, events[cursor:]) == b"".join(whole[cursor:])


# --- OpenAI Chat Completions ---------------------------------------------------------------------------


def test_chat_create_answers_a_completion(oai: openai.OpenAI, edge: Edge) -> None:
    completion = oai.chat.completions.create(
        model="fake",
        messages=[{"role": "developer", "content": "Be brief."}, *HELLO],
        max_completion_tokens=9,
        stop="END",
        seed=3,
        user="u1",
        metadata={"k": "v"},
    )
    assert completion.choices[0].message.content == "Hello, world" and completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (12, 7, 19)
    sent = edge.requests[-1]
    assert sent["system"] == [{"text": "Be brief."}] and sent["max_tokens"] == 9 and sent["stop_sequences"] == ["END"]
    assert sent["metadata"] == {"k": "v", "user_id": "u1"} and sent["seed"] == 3


def test_chat_stream_with_usage(oai: openai.OpenAI, edge: Edge) -> None:
    edge.reply([("text", ["Hel", "lo"])], finish="Length")
    chunks = list(
        oai.chat.completions.create(model="fake", messages=HELLO, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 19
    edge.reply([("text", ["x"])])
    plain = list(oai.chat.completions.create(model="fake", messages=HELLO, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_chat_tool_calls_streamed_and_not_and_the_round_trip(oai: openai.OpenAI, edge: Edge) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather by city", "parameters": WEATHER_TOOL},
        }
    ]
    script = [
        ("tool", "call_1", "weather", ['{"city":', '"Paris"}']),
        ("tool", "call_2", "weather", ['{"city":"Rome"}']),
    ]
    edge.reply(script, finish="ToolUse")
    with oai.chat.completions.stream(
        model="fake", messages=HELLO, tools=tools, tool_choice="required", parallel_tool_calls=False
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("call_1", "weather", {"city": "Paris"}),
        ("call_2", "weather", {"city": "Rome"}),
    ]
    assert edge.requests[-1]["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    edge.reply(script, finish="ToolUse")
    folded = oai.chat.completions.create(model="fake", messages=HELLO, tools=tools)
    assert [(c.id, c.function.name, c.function.arguments) for c in folded.choices[0].message.tool_calls] == [
        (c.id, c.function.name, c.function.arguments) for c in calls
    ]
    messages = [
        *HELLO,
        folded.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rainy"},
    ]
    answer = oai.chat.completions.create(
        model="fake", messages=messages, tools=tools, tool_choice={"type": "function", "function": {"name": "weather"}}
    )
    assert answer.choices[0].message.content == "Hello, world"
    sent = edge.requests[-1]
    assert [b["type"] for b in sent["messages"][1]["content"]] == ["tool_use", "tool_use"]
    assert [b["content"] for b in sent["messages"][2]["content"]] == [
        "Sunny",
        "Rainy",
    ]  # the tool messages: one user turn
    assert sent["tool_choice"] == {"type": "tool", "name": "weather"}


def test_chat_json_schema_parses_into_the_model(oai: openai.OpenAI, edge: Edge) -> None:
    class City(BaseModel):
        name: str
        population: int

    edge.reply([("text", ['{"name": "Oslo", ', '"population": 700000}'])])
    completion = oai.chat.completions.parse(
        model="fake", messages=HELLO, response_format=City, reasoning_effort="minimal"
    )
    assert completion.choices[0].message.parsed == City(name="Oslo", population=700000)
    sent = edge.requests[-1]
    assert (
        sent["output_config"]["format"]["type"] == "json_schema"
        and sent["output_config"]["format"]["schema"]["title"] == "City"
    )
    assert sent["thinking"] == {"enabled": True, "effort": "low"}


def test_chat_images_and_reasoning(oai: openai.OpenAI, edge: Edge) -> None:
    edge.reply([("thinking", ["hm"], None), ("text", ["A cat."])])
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    completion = oai.chat.completions.create(model="fake", messages=[{"role": "user", "content": content}])
    assert completion.choices[0].message.content == "A cat."
    assert completion.choices[0].message.model_extra == {"reasoning_content": "hm"}
    blocks = edge.requests[-1]["messages"][0]["content"]
    assert blocks[1]["source"] == {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    assert blocks[2]["source"] == {"type": "url", "url": "https://example.com/cat.png"}


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"max_token": 5}, "max_token"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_chat_refuses_what_it_cannot_honour_naming_the_field(
    oai: openai.OpenAI, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model="fake", messages=HELLO, extra_body=extra)
    assert info.value.body["param"] == field  # type: ignore[index]


def test_chat_every_chunk_is_a_chat_completion_chunk_and_errors_raise() -> None:
    events = canonical(
        "msg_C", [[("thinking", ["a"], None), ("text", ["b"]), ("tool", "c1", "f", ['{"x":1}'])]], finish="ToolUse"
    )
    frames = sse_events(render(chat.StreamRenderer(include_usage=True), events))
    assert frames[-1]["data"] == "[DONE]"
    for f in frames[:-1]:
        ChatCompletionChunk.model_validate(f["data"])
    failed = canonical(
        "msg_F", [[("text", ["b"])]], finish="Error", error={"type": "timeout_error", "message": "upstream timed out"}
    )
    http = httpx2.Client(transport=httpx2.MockTransport(lambda r: _sse(render(chat.StreamRenderer(), failed))))
    client = openai.OpenAI(api_key="k", base_url="http://edge/v1", http_client=http, max_retries=0)
    with pytest.raises(openai.APIError, match="upstream timed out"):
        list(client.chat.completions.create(model="fake", messages=HELLO, stream=True))


# --- OpenAI Responses --------------------------------------------------------------------------------


def test_responses_create_answers_a_response(oai: openai.OpenAI, edge: Edge) -> None:
    response = oai.responses.create(
        model="fake", input="Hi", instructions="Be brief.", max_output_tokens=20, temperature=0.5, metadata={"k": "v"}
    )
    assert response.status == "completed" and response.output_text == "Hello, world"
    assert response.usage is not None and (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.input_tokens_details.cached_tokens,
    ) == (12, 7, 3)
    assert response.instructions == "Be brief." and response.max_output_tokens == 20 and response.metadata == {"k": "v"}
    assert response.id.startswith("resp_") and response.output[0].id == f"msg_{response.id[5:]}_0"
    sent = edge.requests[-1]
    assert (
        sent["system"] == [{"text": "Be brief."}]
        and sent["max_tokens"] == 20
        and sent["messages"] == [{"role": "user", "content": "Hi"}]
    )


def test_responses_stream_events_validate_and_fold_into_the_final_response(oai: openai.OpenAI, edge: Edge) -> None:
    edge.reply([("thinking", ["Hm", "m."], None), ("text", ["Hel", "lo"])])
    events = list(oai.responses.create(model="fake", input="Hi", stream=True, reasoning={"effort": "high"}))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in (
        "response.reasoning_summary_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
        "response.content_part.added",
    ):
        assert kind in kinds
    final = events[-1].response
    assert (
        final.output_text == "Hello"
        and final.output[0].type == "reasoning"
        and final.output[0].summary[0].text == "Hmm."
    )
    assert edge.requests[-1]["thinking"] == {"enabled": True, "effort": "high"}
    edge.reply([("thinking", ["Hm", "m."], None), ("text", ["Hel", "lo"])])
    with oai.responses.stream(model="fake", input="Hi") as stream:
        helper = stream.get_final_response()
    assert helper.output_text == "Hello"
    assert [i.type for i in helper.output] == [i.type for i in final.output] == ["reasoning", "message"]


def test_responses_function_call_round_trip(oai: openai.OpenAI, edge: Edge) -> None:
    tools = [
        {
            "type": "function",
            "name": "weather",
            "description": "Weather by city",
            "parameters": WEATHER_TOOL,
            "strict": True,
        }
    ]
    edge.reply([("tool", "call_1", "weather", ['{"city":', ' "Paris"}'])], finish="ToolUse")
    events = list(
        oai.responses.create(model="fake", input="Weather in Paris?", tools=tools, tool_choice="required", stream=True)
    )
    assert "response.function_call_arguments.delta" in [e.type for e in events]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == '{"city": "Paris"}'
    call = events[-1].response.output[0]
    assert call.type == "function_call" and call.call_id == "call_1" and call.name == "weather"
    follow = [
        {"role": "user", "content": "Weather in Paris?"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    answer = oai.responses.create(
        model="fake", input=follow, tools=tools, tool_choice={"type": "function", "name": "weather"}
    )
    assert answer.output_text == "Hello, world" and answer.tool_choice.name == "weather"  # type: ignore[union-attr]
    sent = edge.requests[-1]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"][0] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "weather",
        "input": {"city": "Paris"},
    }
    assert sent["messages"][2]["content"][0]["content"] == "Sunny"


def test_responses_json_schema_parses_into_the_model(oai: openai.OpenAI, edge: Edge) -> None:
    class City(BaseModel):
        name: str

    edge.reply([("text", ['{"name": ', '"Oslo"}'])])
    response = oai.responses.parse(model="fake", input="A city", text_format=City)
    assert response.output_parsed == City(name="Oslo")
    assert edge.requests[-1]["output_config"]["format"]["name"] == "City"
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_responses_background_resume_concatenates_to_the_stored_text(oai: openai.OpenAI, edge: Edge) -> None:
    edge.reply([("text", ["Once", " upon", " a", " time", ", the", " end."])])
    started = oai.responses.create(model="fake", input="A story", background=True)
    assert started.status == "queued" and started.background is True
    first, seen = [], -1
    for event in oai.responses.retrieve(started.id, stream=True):
        seen = event.sequence_number
        if event.type == "response.output_text.delta":
            first.append(event.delta)
        if len(first) == 3:
            break  # the client drops the stream
    rest = [
        e.delta
        for e in oai.responses.retrieve(started.id, stream=True, starting_after=seen)
        if e.type == "response.output_text.delta"
    ]
    assert (
        "".join(first) + "".join(rest) == oai.responses.retrieve(started.id).output_text == "Once upon a time, the end."
    )


def test_responses_resuming_after_any_sequence_number_sends_exactly_the_rest() -> None:
    events = canonical(
        "resp_R",
        [[("thinking", ["a"], None), ("text", ["b", "c"]), ("tool", "t", "f", ['{"x":', "1}"])]],
        finish="ToolUse",
    )
    base = resp.response_base({"messages": HELLO}, "resp_R", 1_700_000_000, "fake", True)
    frames = sse_events(render(resp.StreamRenderer(base), events))
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for n, f in enumerate(frames):
        assert (
            f["id"] == str(n)
            and f["data"]["sequence_number"] == n
            and adapter.validate_python(f["data"]).type == f["event"]
        )
    for after in range(-1, len(frames)):
        assert sse_events(render(resp.StreamRenderer(base, starting_after=after), events)) == frames[after + 1 :]


def test_responses_cancel_ends_cancelled(oai: openai.OpenAI, edge: Edge) -> None:
    started = oai.responses.create(model="fake", input="Hi", background=True)
    cancelled_response = oai.responses.cancel(started.id)
    assert cancelled_response.status == "cancelled"
    events = list(oai.responses.retrieve(started.id, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "cancelled"


def test_responses_failed_and_truncated_runs() -> None:
    base = resp.response_base({"messages": HELLO, "max_tokens": 3}, "resp_F", 1_700_000_000, "fake", False)
    failed = canonical(
        "resp_F", [[("text", ["x"])]], finish="Error", error={"type": "upstream_error", "message": "boom"}
    )
    last = sse_events(render(resp.StreamRenderer(base), failed))[-1]
    assert last["event"] == "response.failed" and last["data"]["response"]["error"] == {
        "code": "server_error",
        "message": "boom",
    }
    short = canonical("resp_F", [[("text", ["x"])]], finish="Length")
    last = sse_events(render(resp.StreamRenderer(base), short))[-1]
    assert last["event"] == "response.incomplete" and last["data"]["response"]["incomplete_details"] == {
        "reason": "max_output_tokens"
    }
    assert resp.status_of("completed", "Length") == "incomplete" and resp.status_of("pending", None) == "queued"
    assert resp.status_of("error", None) == "failed" and resp.status_of("processing", None) == "in_progress"


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True, "store": False}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
        ({"temprature": 1}, "temprature"),
    ],
)
def test_responses_refuses_what_it_cannot_honour_naming_the_field(
    oai: openai.OpenAI, extra: dict[str, Any], field: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.responses.create(model="fake", input="Hi", extra_body=extra)
    assert info.value.body["param"] == field  # type: ignore[index]


def test_openai_error_body_has_openais_shape() -> None:
    body = orjson.loads(chat.error_body("rate_limit_error", "slow down", "req_2"))
    assert body == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"},
        "request_id": "req_2",
    }


# --- shared rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [lambda: anth.StreamRenderer(), lambda: resp.StreamRenderer(resp.response_base({}, "resp_S", 0, "fake", True))],
)
def test_watchers_share_each_events_rendered_bytes(make: Any) -> None:
    events = [
        Event(e.seq, e.type, None, e.data)
        for e in canonical("resp_S", [[("text", ["a", "b"]), ("tool", "t", "f", ["{}"])]])
    ]
    first, second = make(), make()
    mine = [first.feed(e) for e in events]
    theirs = [second.feed(e) for e in events]
    assert mine == theirs
    shared = [a is b for a, b in zip(mine, theirs, strict=True) if a]
    assert all(shared) and shared


def test_zero_sampling_values_are_kept() -> None:
    native = resp.parse_request({"model": "m", "input": "Hi", "temperature": 0, "top_p": 0, "seed": 0}).native
    assert (native["temperature"], native["top_p"], native["seed"]) == (0, 0, 0)
    native = chat.parse_request({"model": "m", "messages": HELLO, "temperature": 0, "presence_penalty": 0}).native
    assert (native["temperature"], native["presence_penalty"]) == (0, 0)


def test_two_dialects_watching_one_run_each_keep_their_own_bytes() -> None:
    events = canonical("resp_T", [[("text", ["a"])]])
    base = resp.response_base({}, "resp_T", 0, "fake", True)
    alone = [resp.StreamRenderer(base, shared=False).feed(e) for e in events]
    anth_first = [anth.StreamRenderer().feed(e) for e in events]
    assert [resp.StreamRenderer(base).feed(e) for e in events] == alone
    assert [anth.StreamRenderer().feed(e) for e in events] == anth_first
    assert isinstance(events[0].rendered, dict) and set(events[0].rendered) == {"anthropic", "responses"}
