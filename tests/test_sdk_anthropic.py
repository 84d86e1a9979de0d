"""The official `anthropic` SDK, unchanged, against a real server: in front of the fake upstream
in both wire formats, and the local model. Also the background-run watch in Anthropic's dialect."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import RawMessageStreamEvent

from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.runs import slow, wait_status
from tests.support.server import ServerProcess

UPSTREAM = {"gpt": "gpt-up", "claude": "claude-up"}
HI = [{"role": "user", "content": "Hi"}]
WEATHER = {
    "name": "weather",
    "description": "Weather by city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def claude(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    # No credentials are configured on this server; the SDK insists on a key, which is ignored.
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=30) as client:
        yield client


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_create_answers_an_anthropic_message(claude: anthropic.Anthropic, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Hel", "lo"], usage=(12, 3))])
    message = claude.messages.create(model=model, max_tokens=16, messages=HI)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 3)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_stream_helper_text_and_final_message(claude: anthropic.Anthropic, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Once", " upon", " a time"], usage=(7, 3), finish_reason="length")])
    with claude.messages.stream(model=model, max_tokens=3, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Once upon a time"
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 3)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_tool_use_round_trip(claude: anthropic.Anthropic, fake: FakeUpstream, model: str) -> None:
    call = ToolCall("toolu_01", "weather", ['{"city":', ' "Paris"}'])
    fake.script(UPSTREAM[model], [Reply(tokens=["Looking."], tool_calls=[call]), Reply(tokens=["Sunny in Paris."])])
    with claude.messages.stream(model=model, max_tokens=64, messages=HI, tools=[WEATHER]) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "weather" and use.input == {"city": "Paris"}
    messages: list[Any] = [
        *HI,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]},
    ]
    second = claude.messages.create(model=model, max_tokens=64, messages=messages, tools=[WEATHER])
    assert second.stop_reason == "end_turn" and second.content[0].text == "Sunny in Paris."  # type: ignore[union-attr]
    upstream = fake.requests[-1].body
    assert "Sunny" in str(upstream["messages"])


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_thinking_streams_as_thinking_blocks(claude: anthropic.Anthropic, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(reasoning=["Let me ", "think."], tokens=["42"])])
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with claude.messages.stream(model=model, max_tokens=2048, messages=HI, thinking=thinking) as stream:  # type: ignore[arg-type]
        kinds = {event.type for event in stream}
        final = stream.get_final_message()
    assert "thinking" in kinds and "text" in kinds
    assert final.content[0].type == "thinking" and final.content[0].thinking == "Let me think."
    assert final.content[1].type == "text" and final.content[1].text == "42"


def test_local_model(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="local", max_tokens=8, messages=[{"role": "user", "content": "Say hi."}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0
    message = claude.messages.create(model="local", max_tokens=4, messages=[{"role": "user", "content": "Say hi."}])
    assert message.content and message.stop_reason in ("end_turn", "max_tokens")


def test_model_list(claude: anthropic.Anthropic) -> None:
    models = list(claude.models.list())
    assert {"local", "gpt", "claude"} <= {m.id for m in models}
    assert all(m.type == "model" and m.display_name and m.created_at for m in models)


def _watch(claude: anthropic.Anthropic, mid: str) -> anthropic.Stream[Any]:
    return claude.get(
        f"/v1/messages/async/{mid}/stream",
        cast_to=RawMessageStreamEvent,  # type: ignore[arg-type]
        stream=True,
        stream_cls=anthropic.Stream[RawMessageStreamEvent],
    )


def _frames(raw: bytes) -> list[dict[str, Any]]:
    """Anthropic-dialect SSE frames as {id?, event, data}; only an event's last frame has an id."""
    frames = []
    for block in raw.split(b"\n\n"):
        if block.strip() and not block.startswith(b":"):
            fields = dict(line.decode().split(": ", 1) for line in block.split(b"\n") if not line.startswith(b":"))
            frames.append({**fields, "data": orjson.loads(fields["data"])})
    return frames


def _texts(frames: list[dict[str, Any]]) -> list[str]:
    return [f["data"]["delta"]["text"] for f in frames if f["event"] == "content_block_delta"]


def test_background_run_watched_and_resumed_in_anthropics_dialect(
    claude: anthropic.Anthropic, http: httpx.Client, fake: FakeUpstream
) -> None:
    fake.script("gpt-up", [slow(12, 0.02)])
    mid = http.post("/v1/messages/async", json={"model": "gpt", "max_tokens": 64, "messages": HI}).json()["message_id"]
    buf = b""
    with http.stream("GET", f"/v1/messages/async/{mid}/stream", params={"format": "anthropic"}) as resp:
        for chunk in resp.iter_raw():
            buf += chunk
            if len(_texts(_frames(buf[: buf.rfind(b"\n\n") + 2]))) >= 4:
                break  # the client drops the stream
    first = _frames(buf[: buf.rfind(b"\n\n") + 2])
    cursor = [f["id"] for f in first if "id" in f][-1]
    with http.stream(
        "GET", f"/v1/messages/async/{mid}/stream", params={"format": "anthropic"}, headers={"Last-Event-ID": cursor}
    ) as resp:
        rest = _frames(resp.read())
    expected = "".join(f"t{i} " for i in range(12))
    assert "".join(_texts(first) + _texts(rest)) == expected
    assert {f["data"]["index"] for f in first + rest if "index" in f["data"]} == {0}  # numbering survives the resume
    assert rest[-1]["event"] == "message_stop"
    wait_status(http, mid, {"completed"})
    events = list(_watch(claude, mid))  # a finished run replays whole, parsed by the SDK
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == expected
