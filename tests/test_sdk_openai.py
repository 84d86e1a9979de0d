"""The official `openai` SDK, unchanged, against a real server: Chat Completions and Responses
(background mode included), in front of the fake upstream in both wire formats and the local model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.runs import slow, wait_status
from tests.support.server import ServerProcess

UPSTREAM = {"gpt": "gpt-up", "claude": "claude-up"}
HI: list[Any] = [{"role": "user", "content": "Hi"}]
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOL: Any = {
    "type": "function",
    "function": {"name": "weather", "description": "Weather by city", "parameters": PARAMETERS},
}
RESPONSES_TOOL: Any = {
    "type": "function",
    "name": "weather",
    "description": "Weather by city",
    "parameters": PARAMETERS,
}


class City(BaseModel):
    name: str
    population: int


@pytest.fixture
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    # No credentials are configured on this server; the SDK insists on a key, which is ignored.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


# --- Chat Completions -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_create(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Hel", "lo"], usage=(12, 3))])
    messages: Any = [{"role": "system", "content": "Be brief."}, *HI]
    completion = oai.chat.completions.create(model=model, messages=messages, max_completion_tokens=16, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == model
    assert choice.message.role == "assistant" and choice.message.content == "Hello" and choice.finish_reason == "stop"
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        12,
        3,
    )
    assert "Be brief." in str(fake.requests[-1].body)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_stream_with_usage(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Once", " upon", " a time"], usage=(7, 3))])
    stream = oai.chat.completions.create(
        model=model, messages=HI, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Once upon a time"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 10


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_tool_calls_round_trip(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    calls = [
        ToolCall("call_a", "weather", ['{"city":', ' "Paris"}']),
        ToolCall("call_b", "weather", ['{"city": "Rome"}']),
    ]
    fake.script(
        UPSTREAM[model],
        [Reply(tokens=[], tool_calls=calls), Reply(tokens=[], tool_calls=calls), Reply(tokens=["Both sunny."])],
    )
    with oai.chat.completions.stream(model=model, messages=HI, tools=[CHAT_TOOL]) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    folded = oai.chat.completions.create(model=model, messages=HI, tools=[CHAT_TOOL], tool_choice="required").choices[0]
    for choice in (streamed, folded):
        got = [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]
        assert got == [("call_a", "weather", {"city": "Paris"}), ("call_b", "weather", {"city": "Rome"})]
    messages: Any = [
        *HI,
        folded.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "call_a", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "Sunny too"},
    ]
    answer = oai.chat.completions.create(model=model, messages=messages, tools=[CHAT_TOOL])
    assert answer.choices[0].message.content == "Both sunny." and answer.choices[0].finish_reason == "stop"
    assert "Sunny too" in str(fake.requests[-1].body)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_json_schema(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=['{"name": "Oslo", ', '"population": 700000}'])])
    completion = oai.chat.completions.parse(model=model, messages=HI, response_format=City)
    assert completion.choices[0].message.parsed == City(name="Oslo", population=700000)


def test_chat_local_model(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6
    )
    assert completion.choices[0].message.content and completion.usage and completion.usage.completion_tokens > 0
    chunks = list(
        oai.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# --- Responses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_responses_create(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Hel", "lo"], usage=(12, 3))])
    response = oai.responses.create(model=model, input="Hi", instructions="Be brief.", max_output_tokens=16)
    assert response.object == "response" and response.status == "completed" and response.output_text == "Hello"
    assert response.instructions == "Be brief." and response.model == model
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (12, 3)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_responses_stream(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(reasoning=["Hm", "m."], tokens=["Hel", "lo"])])
    events = list(oai.responses.create(model=model, input="Hi", stream=True, reasoning={"effort": "low"}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.reasoning_summary_text.delta" in kinds and "response.output_text.done" in kinds
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "Hello" and [i.type for i in final.output] == ["reasoning", "message"]


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_responses_function_call_round_trip_and_json_schema(oai: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    call = ToolCall("call_1", "weather", ['{"city": "Paris"}'])
    fake.script(
        UPSTREAM[model],
        [Reply(tokens=[], tool_calls=[call]), Reply(tokens=['{"name": "Paris", "population": 2000000}'])],
    )
    first = oai.responses.create(model=model, input="Weather in Paris?", tools=[RESPONSES_TOOL])
    item = first.output[-1]
    assert (
        item.type == "function_call" and item.call_id == "call_1" and orjson.loads(item.arguments) == {"city": "Paris"}
    )
    follow: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        item.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    parsed = oai.responses.parse(model=model, input=follow, text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2000000)
    assert "Sunny" in str(fake.requests[-1].body)


def _read_deltas(events: Iterator[Any], stop_after: int | None = None) -> tuple[list[str], int]:
    deltas, last = [], -1
    for event in events:
        last = event.sequence_number
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
            if len(deltas) == stop_after:
                break
    return deltas, last


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_background_resume_by_sequence_number(
    oai: openai.OpenAI, http: httpx.Client, fake: FakeUpstream, model: str
) -> None:
    fake.script(UPSTREAM[model], [slow(20, 0.02)])
    started = oai.responses.create(model=model, input="A story", background=True)
    assert started.status == "queued" and started.background is True and started.id.startswith("resp_")
    stream = oai.responses.retrieve(started.id, stream=True)
    first, last = _read_deltas(stream, stop_after=5)
    stream.close()  # dropped after a few events
    rest, _ = _read_deltas(oai.responses.retrieve(started.id, stream=True, starting_after=last))
    done = oai.responses.retrieve(started.id)
    assert done.status == "completed" and "".join(first) + "".join(rest) == done.output_text
    assert done.output_text == "".join(f"t{i} " for i in range(20))
    # The same run on the native surface.
    assert http.get(f"/v1/messages/async/{started.id}/status").json()["status"] == "completed"


def test_background_stream_from_create_and_cancel(oai: openai.OpenAI, http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [slow(300, 0.03)])
    stream = oai.responses.create(model="gpt", input="A long story", background=True, stream=True)
    first = next(iter(stream))
    assert first.type == "response.created"
    response_id = first.response.id  # type: ignore[union-attr]
    deltas, _ = _read_deltas(stream, stop_after=2)
    cancelled = oai.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    rest = list(stream)  # the open stream ends too
    assert rest[-1].response.status == "cancelled"  # type: ignore[union-attr]
    assert oai.responses.retrieve(response_id).status == "cancelled"
    wait_status(http, response_id, {"cancelled"})
    oai.responses.delete(response_id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(response_id)


def test_native_background_run_retrieved_as_a_response(
    oai: openai.OpenAI, http: httpx.Client, fake: FakeUpstream
) -> None:
    fake.script("claude-up", [Reply(tokens=["Hi", " there"])])
    mid = http.post("/v1/messages/async", json={"model": "claude", "max_tokens": 16, "messages": HI}).json()[
        "message_id"
    ]
    wait_status(http, mid, {"completed"})
    response = oai.responses.retrieve(mid)
    assert response.status == "completed" and response.output_text == "Hi there" and response.max_output_tokens == 16


def test_responses_local_model_in_background(oai: openai.OpenAI) -> None:
    started = oai.responses.create(model="local", input="Say hi.", max_output_tokens=6, background=True)
    deltas, _ = _read_deltas(oai.responses.retrieve(started.id, stream=True))
    done = oai.responses.retrieve(started.id)
    assert done.status in ("completed", "incomplete") and "".join(deltas) == done.output_text != ""


def test_model_list(oai: openai.OpenAI) -> None:
    models = list(oai.models.list())
    assert {"local", "gpt", "claude"} <= {m.id for m in models}
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)


def test_background_response_on_every_store(bg_server: ServerProcess, bg: httpx.Client, fake: FakeUpstream) -> None:
    """Read back from SQLite and Redis, events come as stored bytes: the dialect renders those."""
    fake.script("gpt-up", [Reply(reasoning=["Hm."], tokens=[f"w{i} " for i in range(8)], delay=0.01)])
    with openai.OpenAI(base_url=bg_server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        started = client.responses.create(model="gpt", input="Hi", background=True, reasoning={"effort": "low"})
        events = list(client.responses.retrieve(started.id, stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "".join(f"w{i} " for i in range(8)) == client.responses.retrieve(started.id).output_text
        again = list(client.responses.retrieve(started.id, stream=True, starting_after=3))
        assert [e.model_dump() for e in again] == [e.model_dump() for e in events[4:]]
