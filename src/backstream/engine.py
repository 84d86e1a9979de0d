"""The run loop: a validated request in, a stream of events out, independent of HTTP.

Every run, synchronous or background, goes through `Run.events()`; only the sink
that consumes the events differs. A sink cancels a run by cancelling the task
that iterates it (closing the upstream request through the provider's context
managers) and then appends `Run.end_event("Cancelled")`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import EgressSettings, McpServerConfig, ModelConfig, Settings
from .events import Event
from .models import ModelTable
from .providers import Delta, UpstreamError
from .schema import ChatRequest, Message, TextBlock, ThinkingBlock, ToolResultBlock, ToolUseBlock

log = logging.getLogger("backstream.engine")

_START = {"text": "text_start", "thinking": "thinking_start"}
_DELTA = {"text": "text_delta", "thinking": "thinking_delta"}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cache_write_input_tokens", "cache_read_input_tokens", "thought_tokens")
MAX_BACKOFF_S = 30.0


def _empty_usage() -> dict[str, int | None]:
    return dict.fromkeys(USAGE_KEYS)


def _add_usage(total: dict[str, Any], step: dict[str, Any]) -> None:
    for key in USAGE_KEYS:
        v = step.get(key)
        if v is not None:
            total[key] = (total[key] or 0) + v


@dataclass
class RunOptions:
    """Server settings a run needs: where tools may connect, how many steps, tool timeout."""

    egress: EgressSettings = field(default_factory=EgressSettings)
    configured_mcp: dict[str, McpServerConfig] = field(default_factory=dict)  # by name: trusted, token looked up at run time
    max_steps: int = 10
    tool_timeout_s: float = 30.0
    tool_setup_timeout_s: float = 15.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RunOptions:
        return cls(
            egress=settings.egress,
            configured_mcp={s.name: s for s in settings.mcp_servers},
            max_steps=settings.runs.max_steps,
            tool_timeout_s=settings.runs.tool_timeout_s,
            tool_setup_timeout_s=settings.runs.tool_setup_timeout_s,
        )


class Run:
    """One chat run. Iterate `events()` once; it always ends with `stream_end` unless cancelled."""

    def __init__(self, message_id: str, request: ChatRequest, models: ModelTable, config: ModelConfig, options: RunOptions | None = None) -> None:
        self.options = options or RunOptions()
        self.message_id = message_id
        self.request = request
        self.models = models
        self.config = config  # the requested model; `self.served_by` is the one that answered
        self.served_by = config
        self.seq = 0
        self.usage = _empty_usage()
        self.ended = False
        self.started = False  # stream_start emitted
        self.warnings: list[str] = []
        self.finish_reason: str | None = None
        self.error: dict[str, str] | None = None
        self.on_tool_setup: Callable[[bool], None] | None = None  # told when MCP setup begins and ends (the scheduler's queue count)

    def _event(self, type: str, **fields: Any) -> Event:
        self.seq += 1
        return Event.build(self.seq, type, self.message_id, **fields)

    def start_event(self) -> Event:
        self.started = True
        metadata: dict[str, Any] = {"warnings": self.warnings}
        if self.request.correlation_id is not None:
            metadata["correlation_id"] = self.request.correlation_id
        if self.request.metadata:
            metadata["metadata"] = self.request.metadata
        return self._event("stream_start", model=self.served_by.name, provider=self.served_by.provider, metadata=metadata)

    def end_event(self, finish_reason: str, error: dict[str, str] | None = None) -> Event:
        """The final event. Sinks call it themselves for cancellation."""
        self.ended = True
        self.finish_reason = finish_reason
        self.error = error
        fields: dict[str, Any] = {"finish_reason": finish_reason, "usage": self.usage, "citations": None}
        if error is not None:
            fields["error"] = error
        return self._event("stream_end", **fields)

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for event in self._steps():
                yield event
        except UpstreamError as exc:
            if not self.started:
                yield self.start_event()
            yield self.end_event("Error", {"type": exc.type, "message": exc.message})
        except Exception:
            log.exception("run %s failed", self.message_id)
            if not self.started:
                yield self.start_event()
            yield self.end_event("Error", {"type": "api_error", "message": "internal error while running the request"})

    async def _steps(self) -> AsyncIterator[Event]:
        toolbox = None
        request = self.request
        if request.mcp_servers:
            from .tools import ToolBox, ToolSetupError

            reserved = {t.name for t in request.tools or ()}
            toolbox = ToolBox(request.mcp_servers, request.tool_context, self.options, reserved)
            if self.on_tool_setup is not None:
                self.on_tool_setup(True)
            try:
                await toolbox.start()  # before the model slot: a slow MCP server must not hold one
            except ToolSetupError as exc:
                raise UpstreamError("tool_error", str(exc)) from None
            finally:
                if self.on_tool_setup is not None:
                    self.on_tool_setup(False)
            request = request.model_copy(update={"tools": [*(request.tools or ()), *toolbox.specs] or None})
        try:
            step = 0
            while True:
                step += 1
                deltas, first, slot = await self._open(request)
                try:
                    if step == 1:
                        yield self.start_event()
                    async for event in self._step(step, deltas, first):
                        yield event
                finally:
                    await deltas.aclose()
                    self.models.slots.release(slot)
                finish = self._step_finish
                calls = [b for b in self._step_blocks if b.type == "tool_use"]
                if finish != "ToolUse" or toolbox is None or not calls or not all(toolbox.owns(c.name) for c in calls):
                    break
                if step >= self.options.max_steps:
                    yield self.end_event(
                        "Error", {"type": "step_limit", "message": f"the model was still calling tools after {step} steps (runs.max_steps)"}
                    )
                    return
                results = []
                for call in calls:  # in order, so tool_result events follow the calls
                    content, is_error = await toolbox.call(call.name, call.input)
                    yield self._event("tool_result", tool_call_id=call.id, name=call.name, content=content, is_error=is_error)
                    results.append(ToolResultBlock(type="tool_result", tool_use_id=call.id, content=content, is_error=is_error))
                messages = [
                    *request.messages,
                    Message(role="assistant", content=list(self._step_blocks)),
                    Message(role="user", content=results),
                ]
                # Later steps may always answer in text: a forced tool_choice would loop forever.
                request = request.model_copy(update={"messages": messages, "tool_choice": None})
        finally:
            if toolbox is not None:
                await toolbox.aclose()
        error = self._check_output(finish)
        if error is not None:
            yield self.end_event("Error", error)
            return
        yield self.end_event(finish)

    def _check_output(self, finish: str) -> dict[str, str] | None:
        """Structured output: the final text must be JSON valid against the schema."""
        fmt = self.request.output_format
        if fmt is None:
            return None
        text = "".join(b.text for b in self._step_blocks if b.type == "text")
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            why = "was cut off" if finish == "Length" else "is not valid JSON"
            return {"type": "invalid_output", "message": f"the model's output {why}; it must be JSON matching output_config.format.schema"}
        from .json_schemas import output_problem  # RE2 patterns, no fetching, no format work

        problem = output_problem(fmt.schema_, value)
        if problem is not None:
            return {"type": "invalid_output", "message": f"the model's output {problem}"}
        return None

    async def _open(self, request: ChatRequest) -> tuple[AsyncIterator[Delta], Delta | None, str]:
        """Start the upstream call, retrying and falling back only until the first delta arrives."""
        last: UpstreamError | None = None
        for config in self.models.route(self.config):
            provider = self.models.provider(config)
            await self.models.slots.acquire(config.name, self.request.priority)
            try:
                for attempt in range(config.retries + 1):
                    if attempt:
                        await asyncio.sleep(_backoff(config, attempt, last))
                    warnings: list[str] = []
                    deltas = provider.stream(request, warnings)
                    try:
                        first = await anext(deltas, None)
                    except UpstreamError as exc:
                        await deltas.aclose()
                        last = exc
                        log.warning("model %s attempt %d failed: %s", config.name, attempt + 1, exc.message)
                        if not exc.retryable:
                            raise
                        continue
                    except BaseException:
                        await deltas.aclose()
                        raise
                    self.served_by = config
                    if not self.started:
                        self.warnings = warnings
                    if config is not self.config:
                        warnings.append(f"model {self.config.name} failed ({last.message if last else 'error'}); answered by fallback {config.name}")
                    return deltas, first, config.name
            except BaseException:
                self.models.slots.release(config.name)
                raise
            self.models.slots.release(config.name)
        assert last is not None
        raise last

    async def _step(self, step: int, deltas: AsyncIterator[Delta], first: Delta | None) -> AsyncIterator[Event]:
        yield self._event("step_start", step=step)
        block: Any = None  # "text" | "thinking" | tool index
        parts: list[str] = []
        signature: str | None = None
        tools: dict[Any, list[Any]] = {}  # index -> [id, name, fragments]
        usage: dict[str, Any] = {}
        finish: str | None = None
        blocks: list[Any] = []  # this step's content, for the next step's conversation
        self._step_blocks = blocks
        stops = StopMatcher(self.request.stop_sequences) if self.request.stop_sequences else None

        def close() -> Event | None:
            nonlocal block, parts, signature
            if block is None:
                return None
            if block == "text":
                text = "".join(parts)
                blocks.append(TextBlock(type="text", text=text))
                event = self._event("text_complete", text=text)
            elif block == "thinking":
                thinking = "".join(parts)
                blocks.append(ThinkingBlock(type="thinking", thinking=thinking, signature=signature))
                event = self._event("thinking_complete", thinking=thinking, signature=signature)
            else:
                call_id, name, fragments = tools[block]
                raw = "".join(fragments)
                fields: dict[str, Any] = {"tool_call_id": call_id, "name": name}
                try:
                    fields["input"] = orjson.loads(raw) if raw.strip() else {}
                except orjson.JSONDecodeError:
                    fields["input"] = {}
                    fields["error"] = "the model produced invalid JSON arguments"
                if not isinstance(fields["input"], dict):
                    fields["input"] = {"value": fields["input"]}
                blocks.append(ToolUseBlock(type="tool_use", id=call_id, name=name, input=fields["input"]))
                event = self._event("tool_call_complete", **fields)
            block, parts, signature = None, [], None
            return event

        def content(kind: str, text: str) -> list[Event]:
            """A text or thinking delta, opening its block (and closing the previous one) when it starts."""
            nonlocal block
            out = []
            if block != kind:
                if (ev := close()) is not None:
                    out.append(ev)
                block = kind
                out.append(self._event(_START[kind]))
            parts.append(text)
            out.append(self._event(_DELTA[kind], delta=text))
            return out

        pending = first
        next_delta = deltas.__anext__
        while True:
            if pending is not None:
                d, pending = pending, None
            else:
                try:
                    d = await next_delta()
                except StopAsyncIteration:
                    break
            kind = d[0]
            if kind == "text" and stops is not None:
                text, stopped = stops.feed(d[1])
                if stopped:
                    finish = "StopSequence"
                for ev in content("text", text) if text else ():
                    yield ev
                if stopped:
                    break  # leaving the loop closes the upstream request
            elif kind == "text" or kind == "thinking":
                for ev in content(kind, d[1]):
                    yield ev
            elif kind == "tool_delta":
                index = d[1]
                if block != index:
                    if index not in tools:  # fragment without a start: give the call an id of its own
                        for ev in self._tool_start(tools, close, index, None, None):
                            yield ev
                    block = index
                tools[index][2].append(d[2])
                yield self._event("tool_call_delta", tool_call_id=tools[index][0], delta=d[2])
            elif kind == "tool_start":
                for ev in self._tool_start(tools, close, d[1], d[2], d[3]):
                    yield ev
                block = d[1]
            elif kind == "signature":
                signature = (signature or "") + d[1]
            elif kind == "usage":
                usage.update({k: v for k, v in d[1].items() if v is not None})
            elif kind == "finish":
                finish = d[1]
            elif kind == "error":
                raise UpstreamError(d[1], d[2])
        if stops is not None and finish != "StopSequence":
            held = stops.flush()  # text held back in case it began a stop sequence
            for ev in content("text", held) if held else ():
                yield ev
        if (ev := close()) is not None:
            yield ev
        if finish is None:
            finish = "ToolUse" if tools else "Stop"
        step_usage = {k: usage.get(k) for k in USAGE_KEYS}
        _add_usage(self.usage, step_usage)
        self._step_finish = finish
        yield self._event("step_finish", step=step, finish_reason=finish, usage=step_usage)

    def _tool_start(self, tools: dict[Any, list[Any]], close: Any, index: Any, call_id: str | None, name: str | None) -> list[Event]:
        out = []
        if (ev := close()) is not None:
            out.append(ev)
        call_id = call_id or f"toolu_{self.message_id}_{index}"
        tools[index] = [call_id, name or "", []]
        out.append(self._event("tool_call_start", tool_call_id=call_id, name=name or ""))
        return out


class StopMatcher:
    """Finds stop sequences in streamed text, even split across chunks, holding back only what might start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that can be emitted now, and whether a stop sequence was reached."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _backoff(config: ModelConfig, attempt: int, error: UpstreamError | None) -> float:
    delay = config.backoff_s * (2 ** (attempt - 1))
    if error is not None and error.retry_after is not None:
        delay = max(delay, error.retry_after)
    return min(delay, MAX_BACKOFF_S)


class MessageFolder:
    """Folds a run's events into the non-streamed message JSON."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.model = ""
        self.provider = ""
        self.finish_reason = "Stop"
        self.usage: dict[str, Any] = _empty_usage()
        self.error: dict[str, Any] | None = None
        self.warnings: list[str] = []

    def feed(self, event: Event) -> None:
        f = event.load()
        t = event.type
        if t == "text_complete":
            self.content.append({"type": "text", "text": f["text"]})
        elif t == "thinking_complete":
            block = {"type": "thinking", "thinking": f["thinking"]}
            if f.get("signature"):
                block["signature"] = f["signature"]
            self.content.append(block)
        elif t == "tool_call_complete":
            self.content.append({"type": "tool_use", "id": f["tool_call_id"], "name": f["name"], "input": f["input"]})
        elif t == "tool_result":
            self.content.append({"type": "tool_result", "tool_use_id": f["tool_call_id"], "content": f["content"], "is_error": f["is_error"]})
        elif t == "stream_start":
            self.model, self.provider = f["model"], f["provider"]
            self.warnings = (f.get("metadata") or {}).get("warnings") or []
        elif t == "stream_end":
            self.finish_reason = f["finish_reason"]
            self.usage = f["usage"]
            self.error = f.get("error")

    def message(self, message_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "provider": self.provider,
            "content": self.content,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "citations": None,
        }
        if self.warnings:
            out["warnings"] = self.warnings
        if self.error:
            out["error"] = self.error
        return out
