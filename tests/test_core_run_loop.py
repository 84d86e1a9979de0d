"""The run loop (engine.Run) in-process, driven by a scripted provider: the canonical event sequences of
retries, fallbacks, errors after the first token, stop sequences across chunks, client and server tool
steps, the step limit, structured output, cancellation at every stage, and the executor's caps.

No server, no sockets: the provider is swapped in at `model_table.create_provider` (the function the
model table builds providers with), and MCP servers by a fake `tools.ToolBox` (the class the run
opens for `mcp_servers`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from backstream import engine, model_table, tools
from backstream.api_models import ChatRequest, Tool
from backstream.background.executor import LimitExceeded, RunExecutor, StoreSink
from backstream.blocks import StopMatcher
from backstream.config import ModelConfig, load_settings
from backstream.engine import MAX_BACKOFF_S, Run, RunOptions
from backstream.events import Event, new_message_id
from backstream.model_table import ModelTable
from backstream.providers import Provider, UpstreamError
from backstream.providers.base import status_error
from backstream.quotas import build_quotas
from backstream.store import RunRecord
from backstream.store.memory import MemoryStore

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


# --- the scripted provider ----------------------------------------------------------------------


class Gate:
    """A point in a scripted stream where the provider waits: `reached` tells the test, `release` lets it go on."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()


@dataclass
class Call:
    """One upstream call the provider saw: the request, and how its stream ended."""

    request: ChatRequest
    at: float = field(default_factory=time.monotonic)
    yielded: int = 0
    completed: bool = False  # the script ran to its end
    closed: bool = False  # the stream was left early: closed by the run loop, or cancelled
    done: asyncio.Event = field(default_factory=asyncio.Event)


# One scripted call: an exception raised before the first delta, or items to go through in order:
# a delta tuple to yield, an exception to raise, a Gate to wait at.
Script = BaseException | list[Any]


class ScriptedProvider(Provider):
    """Answers each call with the next script (the last one repeats); records every call and its end."""

    def __init__(self, config: ModelConfig, scripts: list[Script], warnings: tuple[str, ...] = ()) -> None:
        super().__init__(config)
        self.name = config.provider
        self.scripts = list(scripts)
        self.warnings = warnings
        self.calls: list[Call] = []
        self.called = asyncio.Event()

    def stream(self, request: ChatRequest, warnings: list[str]) -> AsyncIterator[Any]:
        warnings.extend(self.warnings)
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        call = Call(request)
        self.calls.append(call)
        self.called.set()
        return self._play(call, script)

    async def _play(self, call: Call, script: Script) -> AsyncIterator[Any]:
        try:
            if isinstance(script, BaseException):
                raise script
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Gate):
                    item.reached.set()
                    await item.release.wait()
                    continue
                call.yielded += 1
                yield item
            call.completed = True
        except (GeneratorExit, asyncio.CancelledError):
            call.closed = True
            raise
        finally:
            call.done.set()


def text(*parts: str, finish: str = "Stop", usage: tuple[int, int] | None = (7, 3)) -> list[Any]:
    script: list[Any] = [("text", p) for p in parts]
    if usage is not None:
        script.append(("usage", {"prompt_tokens": usage[0], "completion_tokens": usage[1]}))
    script.append(("finish", finish))
    return script


def tool_call(name: str, args: dict[str, Any], call_id: str = "call_1", index: int = 0) -> list[Any]:
    raw = orjson.dumps(args).decode()
    half = len(raw) // 2
    return [("tool_start", index, call_id, name), ("tool_delta", index, raw[:half]), ("tool_delta", index, raw[half:])]


class Harness:
    """A model table whose providers are scripted, and runs over it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.providers: dict[str, ScriptedProvider] = {}
        self.scripts: dict[str, tuple[list[Script], tuple[str, ...]]] = {}
        self.created = asyncio.Event()  # a provider was built (at the latest for the run's first model call)
        monkeypatch.setattr(model_table, "create_provider", self._create)

    def _create(self, config: ModelConfig) -> Provider:
        unscripted: tuple[list[Script], tuple[str, ...]] = ([AssertionError(f"model {config.name} has no script")], ())
        scripts, warnings = self.scripts.get(config.name, unscripted)
        provider = self.providers[config.name] = ScriptedProvider(config, scripts, warnings)
        self.created.set()
        return provider

    def table(self, *models: dict[str, Any], **settings: Any) -> ModelTable:
        self.settings = load_settings(environ={}, models=list(models), store="memory", **settings)
        self.models = ModelTable(self.settings)
        return self.models

    def calls(self, model: str) -> int:
        """How many upstream calls the model's provider saw (the table may build providers it never calls)."""
        provider = self.providers.get(model)
        return len(provider.calls) if provider is not None else 0

    def script(self, model: str, *scripts: Script, warnings: tuple[str, ...] = ()) -> None:
        self.scripts[model] = (list(scripts), warnings)

    def run(self, model: str = "m", options: RunOptions | None = None, **body: Any) -> Run:
        if not hasattr(self, "models"):
            self.table(model_row("m"))
        request = ChatRequest.model_validate({"messages": USER, **body})
        return Run(new_message_id(), request, self.models, self.models.resolve(model), options or RunOptions())


def model_row(name: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "base_url": "http://upstream.invalid/v1",
        "retries": 0,
        "backoff_s": 0.001,
        **kw,
    }


@pytest.fixture()
def h(monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(monkeypatch)


async def collect(run: Run) -> list[Event]:
    return [e async for e in run.events()]


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def data(events: list[Event], type: str) -> list[dict[str, Any]]:
    return [e.fields for e in events if e.type == type]  # type: ignore[misc]


def end_of(events: list[Event]) -> dict[str, Any]:
    assert events[-1].type == "stream_end", types(events)
    assert types(events).count("stream_end") == 1
    return events[-1].fields  # type: ignore[return-value]


def assert_numbered(events: list[Event], message_id: str) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.fields["message_id"] == message_id for e in events)  # type: ignore[index]
    assert all(orjson.loads(e.data) == e.fields for e in events), "one serialisation, the same content"


ONE_TEXT_STEP = ["stream_start", "step_start", "text_start"]
STEP_END = ["text_complete", "step_finish", "stream_end"]


# --- a plain run ---------------------------------------------------------------------------------


async def test_text_run_event_sequence_and_contents(h: Harness) -> None:
    h.table(model_row("m", aliases=["m-alias"]))
    h.script("m", text("Hel", "lo", " there", usage=(12, 3)), warnings=("top_k is not supported",))
    run = h.run("m-alias", correlation_id="c-42", metadata={"user_id": "u7"})
    events = await collect(run)
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "text_delta", "text_delta", *STEP_END]
    assert_numbered(events, run.message_id)
    start = events[0].fields
    assert start["model"] == "m" and start["provider"] == "openai"
    assert start["metadata"] == {
        "warnings": ["top_k is not supported"],
        "correlation_id": "c-42",
        "metadata": {"user_id": "u7"},
    }
    assert [d["delta"] for d in data(events, "text_delta")] == ["Hel", "lo", " there"]
    assert data(events, "text_complete")[0]["text"] == "Hello there"
    finish = data(events, "step_finish")[0]
    assert finish["step"] == 1 and finish["finish_reason"] == "Stop"
    end = end_of(events)
    assert end["finish_reason"] == "Stop" and "error" not in end
    assert (
        end["usage"]["prompt_tokens"] == 12
        and end["usage"]["completion_tokens"] == 3
        and finish["usage"] == end["usage"]
    )
    call = h.providers["m"].calls[0]
    assert call.completed and not call.closed
    assert run.ended and run.finish_reason == "Stop" and run.served_by.name == "m"


async def test_thinking_then_text_keeps_the_signature_and_thought_tokens(h: Harness) -> None:
    h.script(
        "m",
        [
            ("thinking", "Let me "),
            ("thinking", "think."),
            ("signature", "sig-"),
            ("signature", "1"),
            ("text", "42"),
            ("usage", {"prompt_tokens": 5, "completion_tokens": 4, "thought_tokens": 2}),
            ("finish", "Stop"),
        ],
    )
    events = await collect(h.run())
    assert types(events) == [
        "stream_start",
        "step_start",
        "thinking_start",
        "thinking_delta",
        "thinking_delta",
        "thinking_complete",
        "text_start",
        "text_delta",
        *STEP_END,
    ]
    assert data(events, "thinking_complete")[0] == {
        **data(events, "thinking_complete")[0],
        "thinking": "Let me think.",
        "signature": "sig-1",
    }
    assert end_of(events)["usage"]["thought_tokens"] == 2


async def test_a_stream_without_a_finish_reason_ends_stop_and_usage_stays_null(h: Harness) -> None:
    h.script("m", [("text", "a")])
    events = await collect(h.run())
    end = end_of(events)
    assert end["finish_reason"] == "Stop"
    assert set(end["usage"].values()) == {None}


async def test_length_finish_passes_through(h: Harness) -> None:
    h.script("m", text("a", "b", finish="Length"))
    events = await collect(h.run())
    assert data(events, "step_finish")[0]["finish_reason"] == "Length" and end_of(events)["finish_reason"] == "Length"


# --- retries and fallbacks before the first token -----------------------------------------------


async def test_retries_before_the_first_token_with_backoff(h: Harness) -> None:
    h.table(model_row("m", retries=2, backoff_s=0.02))
    h.script("m", status_error(503, "busy"), status_error(429, "slow down", retry_after=0.06), text("ok"))
    run = h.run()
    events = await collect(run)
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", *STEP_END]
    assert end_of(events)["finish_reason"] == "Stop"
    calls = h.providers["m"].calls
    assert len(calls) == 3
    assert calls[1].at - calls[0].at >= 0.02 - 0.002, "first backoff: backoff_s"
    assert calls[2].at - calls[1].at >= 0.06 - 0.002, "Retry-After beats the doubled backoff"
    assert events[0].fields["metadata"]["warnings"] == [], "a retry of the same model is not a fallback"


def test_backoff_doubles_honours_retry_after_and_is_capped() -> None:
    config = ModelConfig(name="m", provider="openai", backoff_s=0.5)
    assert [engine._backoff(config, a, None) for a in (1, 2, 3)] == [0.5, 1.0, 2.0]
    assert engine._backoff(config, 1, UpstreamError("x", "y", retry_after=3.0)) == 3.0
    assert engine._backoff(config, 3, UpstreamError("x", "y", retry_after=0.1)) == 2.0
    assert engine._backoff(config, 20, None) == MAX_BACKOFF_S
    assert engine._backoff(config, 1, UpstreamError("x", "y", retry_after=3600)) == MAX_BACKOFF_S


async def test_retries_exhausted_end_with_the_last_error(h: Harness) -> None:
    h.table(model_row("m", retries=2))
    h.script("m", status_error(500, "boom"))
    events = await collect(h.run())
    assert types(events) == ["stream_start", "stream_end"]
    end = end_of(events)
    assert end["finish_reason"] == "Error"
    assert end["error"] == {"type": "upstream_error", "message": "upstream error 500: boom"}
    assert len(h.providers["m"].calls) == 3, "one call and two retries"


async def test_a_non_retryable_error_is_neither_retried_nor_sent_to_the_fallback(h: Harness) -> None:
    h.table(model_row("m", retries=2, fallbacks=["fb"]), model_row("fb"))
    h.script("m", status_error(400, "bad request"))
    h.script("fb", text("never"))
    events = await collect(h.run())
    assert end_of(events)["error"]["message"] == "upstream rejected the request (400): bad request"
    assert len(h.providers["m"].calls) == 1
    assert h.calls("fb") == 0, "the fallback was never called"


async def test_fallback_answers_when_the_model_fails(h: Harness) -> None:
    h.table(model_row("m", retries=1, fallbacks=["fb"]), model_row("fb", provider="anthropic", base_url=None))
    h.script("m", status_error(503, "overloaded"))
    h.script("fb", text("from", " fallback"), warnings=("seed is not supported by provider anthropic and was dropped",))
    run = h.run()
    events = await collect(run)
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "text_delta", *STEP_END]
    start = events[0].fields
    assert start["model"] == "fb" and start["provider"] == "anthropic"
    warnings = start["metadata"]["warnings"]
    assert warnings[0].startswith("seed is not supported")
    assert "model m failed" in warnings[1] and "answered by fallback fb" in warnings[1]
    assert len(h.providers["m"].calls) == 2 and len(h.providers["fb"].calls) == 1
    assert run.served_by.name == "fb" and run.config.name == "m"


async def test_all_models_failing_end_with_the_fallbacks_error(h: Harness) -> None:
    h.table(model_row("m", fallbacks=["fb"]), model_row("fb"))
    h.script("m", status_error(503, "m down"))
    h.script("fb", UpstreamError("timeout_error", "upstream did not answer within 5 s", retryable=True))
    events = await collect(h.run())
    assert types(events) == ["stream_start", "stream_end"]
    assert end_of(events)["error"]["type"] == "timeout_error"
    assert events[0].fields["model"] == "m", "stream_start names the requested model when nothing answered"


async def test_no_retry_after_the_first_token(h: Harness) -> None:
    h.table(model_row("m", retries=3, fallbacks=["fb"]), model_row("fb"))
    h.script("m", [("text", "a"), ("text", "b"), status_error(503, "gone mid-stream")])
    h.script("fb", text("never"))
    events = await collect(h.run())
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "text_delta", "stream_end"]
    end = end_of(events)
    assert end["finish_reason"] == "Error" and end["error"]["type"] == "overloaded_error"
    assert h.calls("m") == 1 and h.calls("fb") == 0


async def test_an_error_delta_in_the_stream_ends_the_run(h: Harness) -> None:
    h.table(model_row("m", retries=2))
    h.script("m", [("text", "a"), ("error", "overloaded_error", "Overloaded"), ("text", "never")])
    events = await collect(h.run())
    assert [d["delta"] for d in data(events, "text_delta")] == ["a"]
    assert end_of(events)["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed and len(h.providers["m"].calls) == 1


async def test_an_unexpected_provider_failure_is_an_internal_error(h: Harness) -> None:
    h.table(model_row("m", retries=2))
    h.script("m", RuntimeError("bug"))
    events = await collect(h.run())
    assert types(events) == ["stream_start", "stream_end"]
    assert end_of(events)["error"] == {"type": "api_error", "message": "internal error while running the request"}
    assert len(h.providers["m"].calls) == 1, "only UpstreamErrors are retried"


# --- stop sequences -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stops", "chunks", "emitted", "stopped"),
    [
        (["END"], ["Hello ", "wor", "ld EN", "D and more"], ["Hello ", "wor", "ld ", ""], True),
        (["END"], ["a E", "N", "d"], ["a ", "", "ENd"], False),
        (["END"], ["E", "N", "D"], ["", "", ""], True),
        (["aab"], ["aa", "ab"], ["", "a"], True),
        (["\n\n", "STOP"], ["x\n", "y ST", "OP"], ["x", "\ny ", ""], True),
        (["abcd", "bc"], ["ab", "c"], ["", "a"], True),
        (["xyz"], ["plain"], ["plain"], False),
    ],
)
def test_stop_matcher_across_chunks(stops: list[str], chunks: list[str], emitted: list[str], stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out = []
    hit = False
    for chunk in chunks:
        piece, hit = matcher.feed(chunk)
        out.append(piece)
        if hit:
            break
    assert out == emitted and hit is stopped
    if not stopped:
        assert "".join(out) + matcher.flush() == "".join(chunks), "held text is given back at the end"


async def test_stop_sequence_split_across_chunks_ends_the_run_and_closes_the_upstream(h: Harness) -> None:
    h.script("m", text("Hello ", "wor", "ld EN", "D and more", " text", *["x"] * 50))
    events = await collect(h.run(stop_sequences=["END"]))
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "text_delta", "text_delta", *STEP_END]
    assert [d["delta"] for d in data(events, "text_delta")] == ["Hello ", "wor", "ld "], "no empty deltas"
    assert data(events, "text_complete")[0]["text"] == "Hello world "
    assert data(events, "step_finish")[0]["finish_reason"] == "StopSequence"
    assert end_of(events)["finish_reason"] == "StopSequence"
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed and call.yielded == 4, "the gateway stopped reading at the stop"


async def test_stop_sequence_prefix_that_does_not_complete_is_kept(h: Harness) -> None:
    h.script("m", text("a E", "N", "d"))
    events = await collect(h.run(stop_sequences=["END"]))
    assert data(events, "text_complete")[0]["text"] == "a ENd"
    assert "".join(d["delta"] for d in data(events, "text_delta")) == "a ENd"
    assert end_of(events)["finish_reason"] == "Stop"


async def test_held_stop_prefix_at_the_end_of_the_stream_is_flushed(h: Harness) -> None:
    h.script("m", text("done E"))
    events = await collect(h.run(stop_sequences=["END"]))
    assert data(events, "text_complete")[0]["text"] == "done E" and end_of(events)["finish_reason"] == "Stop"


async def test_held_stop_prefix_is_emitted_before_a_following_tool_call(h: Harness) -> None:
    h.script("m", [("text", "Let me check.\n"), *tool_call("weather", {"city": "Paris"}), ("finish", "ToolUse")])
    events = await collect(h.run(stop_sequences=["\n\nHuman:"], tools=[WEATHER]))
    assert data(events, "text_complete")[0]["text"] == "Let me check.\n"
    assert types(events).count("text_start") == 1, types(events)


# --- client tools -------------------------------------------------------------------------------


async def test_client_tool_call_ends_the_run_with_tool_use(h: Harness) -> None:
    h.script(
        "m", [("text", "Let me check."), *tool_call("weather", {"city": "Paris"}, "toolu_9"), ("finish", "ToolUse")]
    )
    run = h.run(tools=[WEATHER])
    events = await collect(run)
    assert types(events) == [
        *ONE_TEXT_STEP,
        "text_delta",
        "text_complete",
        "tool_call_start",
        "tool_call_delta",
        "tool_call_delta",
        "tool_call_complete",
        "step_finish",
        "stream_end",
    ]
    assert (
        data(events, "tool_call_start")[0] | {"tool_call_id": "toolu_9", "name": "weather"}
        == data(events, "tool_call_start")[0]
    )
    assert "".join(d["delta"] for d in data(events, "tool_call_delta")) == '{"city":"Paris"}'
    complete = data(events, "tool_call_complete")[0]
    assert complete["input"] == {"city": "Paris"} and "error" not in complete
    assert data(events, "step_finish")[0]["finish_reason"] == "ToolUse" and end_of(events)["finish_reason"] == "ToolUse"
    assert len(h.providers["m"].calls) == 1, "client tools are the client's to run"


async def test_tool_use_without_a_finish_reason_still_ends_tool_use(h: Harness) -> None:
    h.script("m", tool_call("weather", {"city": "Oslo"}))
    events = await collect(h.run(tools=[WEATHER]))
    assert end_of(events)["finish_reason"] == "ToolUse"


async def test_invalid_and_non_object_tool_arguments(h: Harness) -> None:
    h.script(
        "m",
        [
            *tool_call("weather", {}),
            ("tool_delta", 0, '{"city": '),
            *tool_call("weather", {}, "c2", 1)[:1],
            ("tool_delta", 1, "[1, 2]"),
            ("finish", "ToolUse"),
        ],
    )
    events = await collect(h.run(tools=[WEATHER]))
    first, second = data(events, "tool_call_complete")
    assert first["input"] == {} and first["error"] == "the model produced invalid JSON arguments"
    assert second["input"] == {"value": [1, 2]} and "error" not in second, "a non-object input is wrapped"
    assert end_of(events)["finish_reason"] == "ToolUse"


async def test_a_tool_call_without_a_start_gets_an_id_of_its_own(h: Harness) -> None:
    h.script("m", [("tool_delta", 1, '{"city": "Rome"}'), ("finish", "ToolUse")])
    run = h.run(tools=[WEATHER])
    events = await collect(run)
    assert data(events, "tool_call_start")[0]["tool_call_id"] == f"toolu_{run.message_id}_1"
    assert data(events, "tool_call_complete")[0]["input"] == {"city": "Rome"}
    assert end_of(events)["finish_reason"] == "ToolUse"


# --- server (MCP) tools -------------------------------------------------------------------------


class FakeToolBox:
    """Stands in for tools.ToolBox (same constructor and methods): tools `add` and `lookup`, no network."""

    instances: list[FakeToolBox] = []
    fail_setup: str | None = None
    setup_gate: Gate | None = None  # start() waits here
    gate: Gate | None = None  # call() waits here

    def __init__(self, servers: list[Any], tool_context: Any, options: Any, reserved_names: set[str]) -> None:
        self.servers, self.tool_context, self.options, self.reserved = servers, tool_context, options, reserved_names
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.started = self.closed = self.cancelled = False
        self.instances.append(self)

    @property
    def specs(self) -> list[Tool]:
        return [
            Tool(name="add", description="Add two integers.", input_schema={"type": "object"}),
            Tool(name="lookup", input_schema={"type": "object"}),
        ]

    def owns(self, name: str) -> bool:
        return name in ("add", "lookup")

    async def start(self) -> None:
        if self.fail_setup:
            raise tools.ToolSetupError(self.fail_setup)
        if self.setup_gate is not None:
            self.setup_gate.reached.set()
            await self.setup_gate.release.wait()
        self.started = True

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        self.calls.append((name, arguments))
        if self.gate is not None:
            self.gate.reached.set()
            try:
                await self.gate.release.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        if name == "add":
            return str(arguments["a"] + arguments["b"]), False
        return f"no such thing: {arguments}", True

    async def aclose(self) -> None:
        self.closed = True


@pytest.fixture()
def toolbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeToolBox]]:
    box = type("Box", (FakeToolBox,), {"instances": []})
    monkeypatch.setattr(tools, "ToolBox", box)
    yield box


MCP = [{"name": "calc", "url": "https://mcp.example.com/mcp"}]


async def test_mcp_tool_steps(h: Harness, toolbox: type[FakeToolBox]) -> None:
    step_one = [
        *tool_call("add", {"a": 2, "b": 3}),
        ("usage", {"prompt_tokens": 5, "completion_tokens": 2}),
        ("finish", "ToolUse"),
    ]
    h.script("m", step_one, text("The answer ", "is 5."))
    run = h.run(mcp_servers=MCP, tools=[WEATHER], tool_choice={"type": "tool", "name": "add"}, tool_context={"k": 1})
    events = await collect(run)
    assert types(events) == [
        "stream_start",
        "step_start",
        "tool_call_start",
        "tool_call_delta",
        "tool_call_delta",
        "tool_call_complete",
        "step_finish",
        "tool_result",
        "step_start",
        "text_start",
        "text_delta",
        "text_delta",
        "text_complete",
        "step_finish",
        "stream_end",
    ]
    assert_numbered(events, run.message_id)
    result = data(events, "tool_result")[0]
    assert result | {"tool_call_id": "call_1", "name": "add", "content": "5", "is_error": False} == result
    assert [d["step"] for d in data(events, "step_start")] == [1, 2]
    assert end_of(events)["finish_reason"] == "Stop"
    box = toolbox.instances[0]
    assert box.started and box.closed and box.calls == [("add", {"a": 2, "b": 3})]
    assert box.reserved == {"weather"} and box.tool_context == {"k": 1}
    first, second = (c.request for c in h.providers["m"].calls)
    assert [t.name for t in first.tools or ()] == ["weather", "add", "lookup"]
    assert first.tool_choice is not None and first.tool_choice.name == "add"
    assert second.tool_choice is None, "later steps may answer in text"
    assistant, user = second.messages[-2:]
    assert assistant.role == "assistant" and assistant.content[0].model_dump(exclude_none=True) == {
        "type": "tool_use",
        "id": "call_1",
        "name": "add",
        "input": {"a": 2, "b": 3},
    }
    assert user.role == "user" and user.content[0].model_dump(exclude_none=True) == {
        "type": "tool_result",
        "tool_use_id": "call_1",
        "content": "5",
        "is_error": False,
    }
    usage = end_of(events)["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["thought_tokens"]) == (12, 5, None), (
        "summed over steps"
    )
    assert [d["usage"]["prompt_tokens"] for d in data(events, "step_finish")] == [5, 7]


async def test_a_client_tool_call_next_to_mcp_tools_ends_tool_use(h: Harness, toolbox: type[FakeToolBox]) -> None:
    h.script(
        "m",
        [*tool_call("add", {"a": 1, "b": 1}), *tool_call("weather", {"city": "Rome"}, "c2", 1), ("finish", "ToolUse")],
    )
    events = await collect(h.run(mcp_servers=MCP, tools=[WEATHER]))
    assert end_of(events)["finish_reason"] == "ToolUse" and "tool_result" not in types(events)
    assert toolbox.instances[0].calls == [] and toolbox.instances[0].closed
    assert len(h.providers["m"].calls) == 1


async def test_tool_errors_reach_the_model(h: Harness, toolbox: type[FakeToolBox]) -> None:
    h.script("m", [*tool_call("lookup", {"q": "x"}), ("finish", "ToolUse")], text("sorry"))
    events = await collect(h.run(mcp_servers=MCP))
    assert data(events, "tool_result")[0]["is_error"] is True
    sent = h.providers["m"].calls[1].request.messages[-1].content[0]
    assert sent.is_error is True and end_of(events)["finish_reason"] == "Stop"


async def test_step_limit_ends_a_looping_model(h: Harness, toolbox: type[FakeToolBox]) -> None:
    h.script("m", [*tool_call("add", {"a": 1, "b": 1}), ("finish", "ToolUse")])
    events = await collect(h.run(mcp_servers=MCP, options=RunOptions(max_steps=3)))
    assert types(events).count("step_start") == 3 and types(events).count("tool_result") == 2
    assert len(h.providers["m"].calls) == 3
    end = end_of(events)
    assert end["finish_reason"] == "Error" and end["error"]["type"] == "step_limit"
    assert "3 steps" in end["error"]["message"] and types(events)[-2] == "step_finish"
    assert toolbox.instances[0].closed


async def test_tool_setup_failure_fails_the_run_before_any_model_call(h: Harness, toolbox: type[FakeToolBox]) -> None:
    toolbox.fail_setup = "MCP server 'calc' was not ready within 15 s"
    h.script("m", text("never"))
    run = h.run(mcp_servers=MCP)
    seen: list[bool] = []
    run.on_tool_setup = seen.append
    events = await collect(run)
    assert types(events) == ["stream_start", "stream_end"]
    assert end_of(events)["error"] == {"type": "tool_error", "message": toolbox.fail_setup}
    assert seen == [True, False] and h.calls("m") == 0


# --- structured output --------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


@pytest.mark.parametrize(
    ("parts", "finish", "error"),
    [
        (['{"age"', ": 36}"], "Stop", None),
        (['{"age": "old"}'], "Stop", "'old' is not of type 'integer'"),
        (["not json"], "Stop", "is not valid JSON"),
        (['{"age": 3'], "Length", "was cut off"),
    ],
)
async def test_structured_output_is_validated(h: Harness, parts: list[str], finish: str, error: str | None) -> None:
    h.script("m", text(*parts, finish=finish))
    events = await collect(h.run(output_config={"format": {"type": "json_schema", "schema": SCHEMA}}))
    end = end_of(events)
    if error is None:
        assert end["finish_reason"] == "Stop" and "error" not in end
    else:
        assert end["finish_reason"] == "Error" and end["error"]["type"] == "invalid_output", end
        assert error in end["error"]["message"]
        assert types(events)[-2] == "step_finish", "the text was streamed before it was judged"


# --- cancellation at every stage ----------------------------------------------------------------


class Consumer:
    """Iterates a run in a task, like a sink, keeping what it received."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.events: list[Event] = []
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for event in self.run.events():
            self.events.append(event)

    async def cancel(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 5)


async def test_cancel_before_the_first_token_closes_the_upstream(h: Harness) -> None:
    gate = Gate()
    h.table(model_row("m", max_concurrency=1))
    h.script("m", [gate, *text("never")])
    run = h.run()
    consumer = Consumer(run)
    await asyncio.wait_for(gate.reached.wait(), 5)
    await consumer.cancel()
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed and call.yielded == 0
    assert consumer.events == [], "nothing is emitted before the first token"
    end = run.end_event("Cancelled")  # what the sink appends
    assert end.seq == 1 and end.fields["finish_reason"] == "Cancelled"
    await asyncio.wait_for(h.models.slots.acquire("m"), 1)  # the model's only slot was released
    h.models.slots.release("m")


async def test_cancel_mid_stream_closes_the_upstream(h: Harness) -> None:
    gate = Gate()
    h.script("m", [("text", "a"), ("text", "b"), gate, *text("never")])
    run = h.run()
    consumer = Consumer(run)
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert [e.type for e in consumer.events] == [*ONE_TEXT_STEP, "text_delta", "text_delta"]
    await consumer.cancel()
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed and call.yielded == 2
    assert run.end_event("Cancelled").seq == len(consumer.events) + 1, "the sink's stream_end follows without a gap"


async def test_closing_the_event_generator_closes_the_upstream(h: Harness) -> None:
    """A synchronous client that leaves: its response stops iterating and closes the generator."""
    h.script("m", text(*[f"t{i} " for i in range(100)]))
    run = h.run()
    events = run.events()
    seen = [await anext(events) for _ in range(5)]
    assert [e.type for e in seen] == [*ONE_TEXT_STEP, "text_delta", "text_delta"]
    await events.aclose()
    call = h.providers["m"].calls[0]
    await asyncio.wait_for(call.done.wait(), 5)
    assert call.closed and not call.completed and call.yielded == 2
    assert not run.ended


async def test_the_upstream_is_closed_by_the_time_aclose_returns(h: Harness) -> None:
    h.script("m", text(*[f"t{i} " for i in range(100)]))
    events = h.run().events()
    for _ in range(5):
        await anext(events)
    await events.aclose()
    assert h.providers["m"].calls[0].closed


async def test_cancel_while_waiting_for_a_model_slot(h: Harness) -> None:
    h.table(model_row("m", max_concurrency=1))
    h.script("m", text("ok"))
    slots = h.models.slots
    await slots.acquire("m")  # another run holds the only slot
    queued = asyncio.Event()
    acquire = slots.acquire

    async def acquire_noted(model: str, priority: int = 0) -> None:
        queued.set()
        await acquire(model, priority)

    h.monkeypatch.setattr(slots, "acquire", acquire_noted)
    consumer = Consumer(h.run())
    await asyncio.wait_for(queued.wait(), 5)
    assert slots.waiting("m") == 1
    await consumer.cancel()
    assert slots.waiting("m") == 0 and h.calls("m") == 0
    slots.release("m")
    await asyncio.wait_for(acquire("m"), 1)  # free again: the cancelled waiter took nothing
    slots.release("m")


async def test_cancel_during_retry_backoff(h: Harness) -> None:
    h.table(model_row("m", retries=3, backoff_s=20))
    h.script("m", status_error(503, "busy"), text("never"))
    consumer = Consumer(h.run())
    await asyncio.wait_for(h.created.wait(), 5)
    await asyncio.wait_for(h.providers["m"].called.wait(), 5)
    await asyncio.wait_for(h.providers["m"].calls[0].done.wait(), 5)  # failed: the run now sleeps 20 s
    started = time.monotonic()
    await consumer.cancel()
    assert time.monotonic() - started < 2, "the backoff sleep was cancelled"
    assert len(h.providers["m"].calls) == 1


async def test_cancel_during_tool_setup(h: Harness, toolbox: type[FakeToolBox]) -> None:
    toolbox.setup_gate = gate = Gate()
    h.script("m", text("never"))
    run = h.run(mcp_servers=MCP)
    seen: list[bool] = []
    run.on_tool_setup = seen.append
    consumer = Consumer(run)
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert seen == [True]
    await consumer.cancel()
    assert seen == [True, False], "the executor's count of runs in tool setup is given back"
    assert h.calls("m") == 0 and consumer.events == []


async def test_cancel_during_a_tool_call(h: Harness, toolbox: type[FakeToolBox]) -> None:
    toolbox.gate = gate = Gate()
    h.script("m", [*tool_call("add", {"a": 2, "b": 3}), ("finish", "ToolUse")], text("never"))
    run = h.run(mcp_servers=MCP)
    consumer = Consumer(run)
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert consumer.events[-1].type == "step_finish"
    await consumer.cancel()
    box = toolbox.instances[0]
    assert box.cancelled and box.closed, "the tool call was cancelled and the MCP sessions closed"
    assert h.providers["m"].calls[0].completed and len(h.providers["m"].calls) == 1
    assert "tool_result" not in types(consumer.events)


# --- background runs: the store sink, caps, cancel ----------------------------------------------


class Queue:
    """The dispatcher's side of RunQueue: records what the executor reports."""

    def __init__(self) -> None:
        self.finished_runs: list[str] = []
        self.handed_over: list[str] = []

    async def hand_over(self, record: RunRecord) -> None:
        self.handed_over.append(record.message_id)

    async def finished(self, record: RunRecord) -> None:
        self.finished_runs.append(record.message_id)


async def executor_for(h: Harness, **runs: Any) -> tuple[RunExecutor, MemoryStore, Queue]:
    models = h.table(model_row("m"), runs=runs) if runs else h.table(model_row("m"))
    store = MemoryStore()
    executor = RunExecutor(h.settings, store, models, build_quotas(h.settings))
    executor.queue = queue = Queue()
    return executor, store, queue


async def launch(executor: RunExecutor, store: MemoryStore, h: Harness, **body: Any) -> RunRecord:
    chat = ChatRequest.model_validate({"messages": USER, **body})
    record = RunRecord(tenant="t", message_id=new_message_id(), request=chat.model_dump_json().encode(), model="m")
    assert await store.create_run(record)
    executor.launch(record, chat, h.models.resolve("m"))
    return record


async def finished_run(executor: RunExecutor, store: MemoryStore, record: RunRecord) -> tuple[RunRecord, list[Event]]:
    task = executor._tasks.get(record.key)
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), 5)
    stored = await store.get_run(*record.key)
    assert stored is not None
    return stored, await store.read_stored(*record.key, limit=100_000)


async def test_background_run_is_stored_and_completed(h: Harness) -> None:
    executor, store, queue = await executor_for(h)
    h.script("m", text("a", "b"))
    record = await launch(executor, store, h)
    stored, events = await finished_run(executor, store, record)
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "text_delta", *STEP_END]
    assert stored.status == "completed" and stored.event_count == len(events)
    assert stored.metadata["model"] == "m" and queue.finished_runs == [record.message_id]


@pytest.mark.parametrize(("cap", "value"), [("max_events", 10), ("max_bytes", 2048)])
async def test_caps_end_the_run_with_limit_exceeded(h: Harness, cap: str, value: int) -> None:
    executor, store, _ = await executor_for(h, **{cap: value})
    h.script("m", text(*[f"token-{i:03d} " * 8 for i in range(200)]))
    record = await launch(executor, store, h)
    stored, events = await finished_run(executor, store, record)
    end = end_of(events)
    assert end["finish_reason"] == "Error" and end["error"]["type"] == "limit_exceeded", end
    assert f"runs.{cap}" in end["error"]["message"]
    assert [e.seq for e in events[:-1]] == list(range(1, len(events))), "stored in order"
    if cap == "max_events":
        assert len(events) == value, "the cap counts stream_end too"
    else:
        assert sum(len(e.data) for e in events[:-1]) <= value
    assert stored.status == "failed" and stored.error_message == end["error"]["message"]
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed, "the upstream was closed at the cap"


async def test_the_limit_exceeded_stream_end_follows_without_a_gap(h: Harness) -> None:
    executor, store, _ = await executor_for(h, max_events=10)
    h.script("m", text(*[f"t{i} " for i in range(50)]))
    record = await launch(executor, store, h)
    stored, events = await finished_run(executor, store, record)
    assert end_of(events)["error"]["type"] == "limit_exceeded"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert stored.event_count == len(events)


def test_store_sink_caps_count_and_bytes() -> None:
    store = MemoryStore()
    record = RunRecord(tenant="t", message_id="msg_1")
    sink = StoreSink(store, record, max_events=3, max_bytes=10_000)

    def ev(seq: int, type: str, size: int = 10) -> Event:
        return Event(seq, type, None, b"x" * size)

    calls: list[int] = []
    store.enqueue = lambda tenant, mid, event: calls.append(event.seq)  # type: ignore[method-assign]
    sink.add(ev(1, "text_delta"))
    sink.add(ev(2, "text_delta"))
    with pytest.raises(LimitExceeded, match="max_events"):
        sink.add(ev(3, "text_delta"))
    sink.add(ev(3, "stream_end"))  # the ending always fits
    assert calls == [1, 2, 3] and sink.count == 3 and sink.last is not None and sink.last.type == "stream_end"
    sink = StoreSink(store, record, max_events=100, max_bytes=25)
    sink.add(ev(1, "text_delta", 20))
    with pytest.raises(LimitExceeded, match="max_bytes"):
        sink.add(ev(2, "text_delta", 6))
    sink.add(ev(2, "stream_end", 500))
    assert sink.bytes == 520


async def test_cancelling_a_background_run_mid_stream(h: Harness) -> None:
    executor, store, queue = await executor_for(h)
    gate = Gate()
    h.script("m", [("text", "a"), gate, *text("never")])
    record = await launch(executor, store, h)
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert await executor.cancel_and_wait(*record.key)
    stored, events = await finished_run(executor, store, record)
    assert types(events) == [*ONE_TEXT_STEP, "text_delta", "stream_end"]
    assert end_of(events)["finish_reason"] == "Cancelled"
    assert stored.status == "cancelled" and queue.finished_runs == [record.message_id]
    call = h.providers["m"].calls[0]
    assert call.closed and not call.completed


async def test_cancelling_a_background_run_before_its_first_token(h: Harness) -> None:
    executor, store, _ = await executor_for(h)
    gate = Gate()
    h.script("m", [gate, *text("never")])
    record = await launch(executor, store, h)
    await asyncio.wait_for(gate.reached.wait(), 5)
    assert await executor.cancel_and_wait(*record.key)
    stored, events = await finished_run(executor, store, record)
    assert types(events) == ["stream_end"] and end_of(events)["finish_reason"] == "Cancelled"
    assert stored.status == "cancelled"
    assert h.providers["m"].calls[0].closed
