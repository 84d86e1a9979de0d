"""The run loop: a validated request in, a stream of events out, independent of HTTP.

Every run, synchronous or background, goes through `Run.events()`; only the sink
that consumes the events differs. A sink cancels a run by cancelling the task
that iterates it (closing the upstream request through the provider's context
managers) and then appends `Run.end_event("Cancelled")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from . import logs, metrics, tracing
from .api_models import ChatRequest, Message, ToolResultBlock, ToolUseBlock
from .blocks import StepAssembler, StepResult, StopMatcher
from .config import EgressSettings, McpServerConfig, ModelConfig, Settings, ToolsSettings
from .events import Event
from .model_table import ModelTable
from .providers import Delta, UpstreamError
from .statuses import FinishReason
from .usage import add_usage, empty_usage

if TYPE_CHECKING:
    from .builtin_tools.toolset import ServerTools

log = logging.getLogger("backstream.engine")

MAX_BACKOFF_S = 30.0


@dataclass
class RunOptions:
    """Server settings a run needs: where tools may connect, how many steps, tool timeout."""

    egress: EgressSettings = field(default_factory=EgressSettings)
    configured_mcp: dict[str, McpServerConfig] = field(
        default_factory=dict
    )  # by name: trusted, token looked up at run time
    max_steps: int = 10
    tool_timeout_s: float = 30.0
    tool_setup_timeout_s: float = 15.0
    tools: ToolsSettings = field(default_factory=ToolsSettings)  # built-in tools
    data_dir: str = "./.backstream"  # where built-in tools keep files (container directories)

    @classmethod
    def from_settings(cls, settings: Settings) -> RunOptions:
        return cls(
            egress=settings.egress,
            configured_mcp={s.name: s for s in settings.mcp_servers},
            max_steps=settings.runs.max_steps,
            tool_timeout_s=settings.runs.tool_timeout_s,
            tool_setup_timeout_s=settings.runs.tool_setup_timeout_s,
            tools=settings.tools,
            data_dir=settings.data_dir,
        )


class Run:
    """One chat run. Iterate `events()` once; it always ends with `stream_end` unless cancelled."""

    def __init__(
        self,
        message_id: str,
        request: ChatRequest,
        models: ModelTable,
        config: ModelConfig,
        options: RunOptions | None = None,
        tenant: str = "default",
    ) -> None:
        self.options = options or RunOptions()
        self.tenant = tenant  # whose run: built-in tools keep per-tenant state (container directories)
        self.message_id = message_id
        self.request = request
        self.models = models
        self.config = config  # the requested model; `self.served_by` is the one that answered
        self.served_by = config
        self.seq = 0
        self.usage = empty_usage()
        self.ended = False
        self.started = False  # stream_start emitted
        self.warnings: list[str] = []
        self.finish_reason: str | None = None
        self.error: dict[str, str] | None = None
        self.on_tool_setup: Callable[[bool], None] | None = (
            None  # told when MCP setup begins and ends (the executor's queue count)
        )
        self.started_at: float | None = None  # monotonic: the run loop began (metrics)
        self.first_token_at: float | None = None  # monotonic: the first upstream delta arrived (metrics)
        self.span: Any = None  # the run's span, the current model call's span: only when tracing is on
        self.call_span: Any = None
        self.citations: list[dict[str, Any]] = []  # every text block's citations, for stream_end
        self.context_report: dict[str, Any] | None = None  # what context_management dropped before step 1
        # Built in the request's task (sync) or the run's own task (background): its log lines carry these.
        logs.bind(message_id=message_id, model=config.name)

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
        if self.context_report is not None:
            metadata["context_management"] = self.context_report
        return self._event(
            "stream_start", model=self.served_by.name, provider=self.served_by.provider, metadata=metadata
        )

    def end_event(self, finish_reason: str, error: dict[str, str] | None = None) -> Event:
        """The final event. Sinks call it themselves for cancellation."""
        self.ended = True
        self.finish_reason = finish_reason
        self.error = error
        fields: dict[str, Any] = {
            "finish_reason": finish_reason,
            "usage": self.usage,
            "citations": self.citations or None,
        }
        if error is not None:
            fields["error"] = error
        return self._event("stream_end", **fields)

    async def events(self) -> AsyncGenerator[Event, None]:
        self.started_at = time.monotonic()
        if tracing.TRACER is not None:
            self.span = tracing.start(
                f"run {self.config.name}",
                {"gen_ai.request.model": self.config.name, "backstream.run.id": self.message_id},
            )
        try:
            # aclosing: when our consumer closes us, the steps (and the upstream request) close now, not at GC.
            async with contextlib.aclosing(self._steps()) as steps:
                async for event in steps:
                    yield event
        except UpstreamError as exc:
            if not self.started:
                yield self.start_event()
            yield self.end_event(FinishReason.ERROR, {"type": exc.type, "message": exc.message})
        except Exception:
            log.exception("run %s failed", self.message_id)
            if not self.started:
                yield self.start_event()
            yield self.end_event(
                FinishReason.ERROR, {"type": "api_error", "message": "internal error while running the request"}
            )
        finally:
            if self.span is not None:
                self._end_span()

    def _end_span(self) -> None:
        tracing.usage(self.span, self.usage, self.finish_reason or "cancelled")
        self.span.set_attribute("gen_ai.response.model", self.served_by.name)
        if self.error is not None:
            tracing.fail(self.span, self.error.get("type", "error"), self.error.get("message", ""))
        self.span.end()

    async def _steps(self) -> AsyncGenerator[Event, None]:
        request = self.request
        toolbox = await self._open_toolbox() if request.has_server_tools else None
        if toolbox is not None:
            request = request.model_copy(update={"tools": [*(request.tools or ()), *toolbox.specs] or None})
        try:
            step = 0
            while True:
                step += 1
                step_request, report = self._step_request(request, toolbox)
                assembler = StepAssembler(self._event, self.message_id, toolbox.cite if toolbox is not None else None)
                async with self._model_call(step_request) as (deltas, first):
                    if step == 1:
                        self.context_report = report
                        yield self.start_event()
                    elif report is not None:
                        yield self._event("context_trimmed", step=step, context_management=report)
                    async for event in self._step(step, deltas, first, assembler):
                        yield event
                result = assembler.result()
                self.citations.extend(c for b in result.blocks if b.type == "text" for c in b.citations or ())
                calls = result.tool_calls()
                if (
                    result.finish_reason != FinishReason.TOOL_USE
                    or toolbox is None
                    or not calls
                    or not all(toolbox.owns(c.name) for c in calls)
                ):
                    break
                if step >= self.options.max_steps:
                    message = f"the model was still calling tools after {step} steps (runs.max_steps)"
                    yield self.end_event(FinishReason.ERROR, {"type": "step_limit", "message": message})
                    return
                results: list[ToolResultBlock] = []
                async for event in self._call_tools(toolbox, calls, results):
                    yield event
                messages = [
                    *request.messages,
                    Message(role="assistant", content=list(result.blocks)),
                    Message(role="user", content=results),
                ]
                # Later steps may always answer in text: a forced tool_choice would loop forever.
                request = request.model_copy(update={"messages": messages, "tool_choice": None})
        finally:
            if toolbox is not None:
                await toolbox.aclose()
        error = self._check_output(result)
        yield self.end_event(FinishReason.ERROR, error) if error is not None else self.end_event(result.finish_reason)

    def _step_request(self, request: ChatRequest, toolbox: ServerTools | None) -> tuple[ChatRequest, Any]:
        """One model call's request: loaded skills joined to the system prompt, then fitted to the context window."""
        from .builtin_tools.context_window import fit

        if toolbox is not None:
            request = toolbox.prepare(request)
        return fit(request, self.config)

    async def _open_toolbox(self) -> ServerTools:
        """Set up built-in tools and connect to MCP servers, before any model slot is taken."""
        from .builtin_tools.toolset import ServerTools
        from .tools import ToolBox, ToolSetupError

        reserved = {t.name for t in self.request.tools or ()} | {t.tool_name for t in self.request.builtin_tools or ()}
        mcp = (
            ToolBox(self.request.mcp_servers, self.request.tool_context, self.options, reserved)
            if self.request.mcp_servers
            else None
        )
        toolbox = ServerTools(self.request, self.options, self.models, mcp, self.tenant)
        if self.span is not None and mcp is not None:
            mcp.trace_headers = tracing.headers(self.span)  # set-up requests: the run's trace
        if self.on_tool_setup is not None:
            self.on_tool_setup(True)
        try:
            await toolbox.start()  # before the model slot: a slow MCP server must not hold one
        except ToolSetupError as exc:
            raise UpstreamError("tool_error", str(exc)) from None
        finally:
            if self.on_tool_setup is not None:
                self.on_tool_setup(False)
        return toolbox

    async def _call_tools(
        self, toolbox: ServerTools, calls: list[ToolUseBlock], results: list[ToolResultBlock]
    ) -> AsyncIterator[Event]:
        """Run the step's tool calls in order (so tool_result events follow the calls), collecting their results."""
        for call in calls:
            span = None if tracing.TRACER is None else self._tool_span(toolbox, call)
            try:
                outcome = await toolbox.call(call.name, call.input)
                content, is_error = outcome.content, outcome.is_error
                if span is not None and is_error:
                    tracing.fail(span, "tool_error", content[:200])
            finally:
                if span is not None:
                    span.end()
            yield self._event(
                "tool_result",
                tool_call_id=call.id,
                name=call.name,
                content=content,
                is_error=is_error,
                **(outcome.extra or {}),
            )
            results.append(ToolResultBlock(type="tool_result", tool_use_id=call.id, content=content, is_error=is_error))

    def _tool_span(self, toolbox: ServerTools, call: ToolUseBlock) -> Any:
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.name}
        span = tracing.start(f"execute_tool {call.name}", attributes | {"gen_ai.tool.call.id": call.id}, self.span)
        if toolbox.mcp is not None:
            toolbox.mcp.trace_headers = tracing.headers(span)  # the MCP requests of this call carry its traceparent
        return span

    def _check_output(self, result: StepResult) -> dict[str, str] | None:
        """Structured output: the final text must be JSON valid against the schema."""
        fmt = self.request.output_format
        if fmt is None:
            return None
        try:
            value = orjson.loads(result.text())
        except orjson.JSONDecodeError:
            why = "was cut off" if result.finish_reason == FinishReason.LENGTH else "is not valid JSON"
            return {
                "type": "invalid_output",
                "message": f"the model's output {why}; it must be JSON matching output_config.format.schema",
            }
        from .json_schemas import output_problem  # RE2 patterns, no fetching, no format work

        problem = output_problem(fmt.schema_, value)
        if problem is not None:
            return {"type": "invalid_output", "message": f"the model's output {problem}"}
        return None

    @asynccontextmanager
    async def _model_call(
        self, request: ChatRequest
    ) -> AsyncIterator[tuple[AsyncGenerator[Delta, None], Delta | None]]:
        """An upstream call that has answered, with its model's slot held until the block ends.

        Retries and falls back only until the first delta arrives; leaving the block closes
        the upstream request, then frees the slot.
        """
        last: UpstreamError | None = None
        for config in self.models.route(self.config):
            async with self.models.slots.hold(config.name, self.request.priority):
                opened = await self._first_delta(config, request, last)
                if isinstance(opened, UpstreamError):
                    last = opened
                    continue
                deltas, first = opened
                try:
                    yield deltas, first
                except UpstreamError as exc:  # after the first delta: the call failed mid-stream
                    if self.call_span is not None:
                        tracing.fail(self.call_span, exc.type, exc.message)
                    raise
                finally:
                    await deltas.aclose()
                    if self.call_span is not None:
                        self.call_span.end()
                        self.call_span = None
                return
        assert last is not None
        raise last

    async def _first_delta(
        self, config: ModelConfig, request: ChatRequest, last: UpstreamError | None
    ) -> tuple[AsyncGenerator[Delta, None], Delta | None] | UpstreamError:
        """Call one model, with its retries; the stream and its first delta, or the last retryable error."""
        provider = self.models.provider(config)
        for attempt in range(config.retries + 1):
            if attempt:
                metrics.RETRIES.labels(config.name).inc()
                await asyncio.sleep(_backoff(config, attempt, last))
            warnings: list[str] = []
            deltas = provider.stream(request, warnings)
            span = None if tracing.TRACER is None else self._call_span(config)
            try:
                with tracing.current(span):  # the request goes out now: it carries the span's traceparent
                    first = await anext(deltas, None)
            except UpstreamError as exc:
                await deltas.aclose()
                if span is not None:
                    tracing.fail(span, exc.type, exc.message)
                    span.end()
                last = exc
                metrics.upstream_failed(config.name, config.provider, exc.type)
                log.warning("model %s attempt %d failed: %s", config.name, attempt + 1, exc.message)
                if not exc.retryable:
                    raise
                continue
            except BaseException:
                await deltas.aclose()
                if span is not None:
                    span.end()
                raise
            self.served_by, self.call_span = config, span
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if not self.started:
                self.warnings = warnings
                if config is not self.config:
                    metrics.FALLBACKS.labels(self.config.name, config.name).inc()
            if config is not self.config:
                warnings.append(
                    f"model {self.config.name} failed ({last.message if last else 'error'}); answered by fallback {config.name}"
                )
            return deltas, first
        assert last is not None
        return last

    def _call_span(self, config: ModelConfig) -> Any:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": config.provider,
            "gen_ai.request.model": config.upstream_model or config.name,
            "backstream.model": config.name,
        }
        if self.request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = self.request.max_tokens
        return tracing.start(f"chat {config.upstream_model or config.name}", attributes, self.span, "CLIENT")

    async def _step(
        self, step: int, deltas: AsyncIterator[Delta], first: Delta | None, assembler: StepAssembler
    ) -> AsyncIterator[Event]:
        """One model call's events: step_start, its blocks, step_finish. The outcome is `assembler.result()`."""
        yield self._event("step_start", step=step)
        stops = StopMatcher(self.request.stop_sequences) if self.request.stop_sequences else None
        pending = first
        next_delta, apply = deltas.__anext__, assembler.apply
        while True:
            if pending is not None:
                d, pending = pending, None
            else:
                try:
                    d = await next_delta()
                except StopAsyncIteration:
                    break
            if stops is not None and d[0] == "text":
                text, stopped = stops.feed(d[1])
                if stopped:
                    assembler.finish = FinishReason.STOP_SEQUENCE
                for ev in assembler.content("text", text) if text else ():
                    yield ev
                if stopped:
                    break  # leaving the loop closes the upstream request
                continue
            if stops is not None and d[0] in _NEW_BLOCK:
                # Another block begins: text held back as a possible stop prefix belongs before it.
                for ev in assembler.content("text", held) if (held := stops.flush()) else ():
                    yield ev
            for ev in apply(d):
                yield ev
        if stops is not None and assembler.finish != FinishReason.STOP_SEQUENCE:
            held = stops.flush()  # text held back in case it began a stop sequence
            for ev in assembler.content("text", held) if held else ():
                yield ev
        for ev in assembler.close():
            yield ev
        result = assembler.result()
        add_usage(self.usage, result.usage)
        if self.call_span is not None:
            tracing.usage(self.call_span, result.usage, result.finish_reason)
        yield self._event("step_finish", step=step, finish_reason=result.finish_reason, usage=result.usage)


_NEW_BLOCK = frozenset({"thinking", "tool_start", "tool_delta"})  # deltas that open a block other than text


def _backoff(config: ModelConfig, attempt: int, error: UpstreamError | None) -> float:
    delay = config.backoff_s * (2 ** (attempt - 1))
    if error is not None and error.retry_after is not None:
        delay = max(delay, error.retry_after)
    return min(delay, MAX_BACKOFF_S)
