"""One model call's deltas become content blocks: their events, and the content for the next step.

`StepAssembler` holds the block being streamed (text, thinking, or a tool call by
index) and returns the events each delta implies: a block's start when it opens,
its deltas, and its `*_complete` when the next block (or the step) closes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .api_models import TextBlock, ThinkingBlock, ToolUseBlock
from .events import Event
from .providers import Delta, UpstreamError
from .statuses import FinishReason
from .usage import USAGE_KEYS

_START = {"text": "text_start", "thinking": "thinking_start"}
_DELTA = {"text": "text_delta", "thinking": "thinking_delta"}


@dataclass
class StepResult:
    """How a step ended and what the model said in it (the assistant turn of the next step)."""

    finish_reason: str
    blocks: list[Any]
    usage: dict[str, Any]

    def tool_calls(self) -> list[ToolUseBlock]:
        return [b for b in self.blocks if b.type == "tool_use"]

    def text(self) -> str:
        return "".join(b.text for b in self.blocks if b.type == "text")


class StepAssembler:
    """Assembles one step's blocks; every method returns the events to emit, in order."""

    def __init__(
        self,
        emit: Callable[..., Event],
        message_id: str,
        cite: Callable[[str], list[dict[str, Any]] | None] | None = None,
    ) -> None:
        self._emit = emit  # the run's event builder: numbers events in order
        self._cite = cite  # a finished text block's citations (built-in search results it draws on), if any
        self._cited: list[dict[str, Any]] = []  # citations the upstream sent for the open text block
        self._message_id = message_id
        self._open: Any = None  # "text" | "thinking" | tool index
        self._parts: list[str] = []
        self._signature: str | None = None
        self._tools: dict[Any, list[Any]] = {}  # index -> [id, name, fragments]
        self._blocks: list[Any] = []
        self._usage: dict[str, Any] = {}
        self.finish: str | None = None

    def content(self, kind: str, text: str) -> list[Event]:
        """A text or thinking delta, opening its block (and closing the previous one) when it starts."""
        if self._open == kind:
            self._parts.append(text)
            return [self._emit(_DELTA[kind], delta=text)]
        out = self.close()
        self._open = kind
        out.append(self._emit(_START[kind]))
        self._parts.append(text)
        out.append(self._emit(_DELTA[kind], delta=text))
        return out

    def tool_start(self, index: Any, call_id: str | None, name: str | None) -> list[Event]:
        out = self.close()
        call_id = call_id or f"toolu_{self._message_id}_{index}"
        self._tools[index] = [call_id, name or "", []]
        out.append(self._emit("tool_call_start", tool_call_id=call_id, name=name or ""))
        self._open = index
        return out

    def tool_delta(self, index: Any, fragment: str) -> list[Event]:
        out: list[Event] = []
        if self._open != index:
            if index not in self._tools:  # fragment without a start: give the call an id of its own
                out = self.tool_start(index, None, None)
            self._open = index
        call = self._tools[index]
        call[2].append(fragment)
        out.append(self._emit("tool_call_delta", tool_call_id=call[0], delta=fragment))
        return out

    def apply(self, delta: Delta) -> list[Event]:
        """The events one upstream delta makes (none for usage and finish notes)."""
        kind = delta[0]
        if kind == "text" or kind == "thinking":
            return self.content(kind, delta[1])
        if kind == "tool_delta":
            return self.tool_delta(delta[1], delta[2])
        if kind == "tool_start":
            return self.tool_start(delta[1], delta[2], delta[3])
        self.note(delta)
        return []

    def note(self, delta: Delta) -> None:
        """A delta that emits nothing by itself: signature, usage, finish reason, or an upstream error."""
        kind = delta[0]
        if kind == "signature":
            self._signature = (self._signature or "") + delta[1]
        elif kind == "usage":
            self._usage.update({k: v for k, v in delta[1].items() if v is not None})
        elif kind == "finish":
            self.finish = delta[1]
        elif kind == "citation":
            self._cited.append(delta[1])
        elif kind == "error":
            raise UpstreamError(delta[1], delta[2])

    def close(self) -> list[Event]:
        """Complete the open block, if any: its `*_complete` event, and the block for the conversation."""
        if self._open is None:
            return []
        if self._open == "text":
            text = "".join(self._parts)
            own = self._cite(text) if self._cite is not None else None
            citations = [*self._cited, *(own or ())] or None
            self._cited = []
            self._blocks.append(TextBlock(type="text", text=text, citations=citations))
            event = (
                self._emit("text_complete", text=text, citations=citations)
                if citations
                else self._emit("text_complete", text=text)
            )
        elif self._open == "thinking":
            thinking = "".join(self._parts)
            self._blocks.append(ThinkingBlock(type="thinking", thinking=thinking, signature=self._signature))
            event = self._emit("thinking_complete", thinking=thinking, signature=self._signature)
        else:
            event = self._complete_tool(*self._tools[self._open])
        self._open, self._parts, self._signature = None, [], None
        return [event]

    def _complete_tool(self, call_id: str, name: str, fragments: list[str]) -> Event:
        raw = "".join(fragments)
        fields: dict[str, Any] = {"tool_call_id": call_id, "name": name}
        try:
            fields["input"] = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            fields["input"] = {}
            fields["error"] = "the model produced invalid JSON arguments"
        if not isinstance(fields["input"], dict):
            fields["input"] = {"value": fields["input"]}
        if not name:
            fields["error"] = "the model called a tool without naming it"
        # Constructed, not validated: a nameless call from upstream must end as a tool call, not crash the run.
        self._blocks.append(ToolUseBlock.model_construct(type="tool_use", id=call_id, name=name, input=fields["input"]))
        return self._emit("tool_call_complete", **fields)

    def result(self) -> StepResult:
        """The step's outcome, once every block is closed."""
        finish = self.finish
        if finish is None:
            finish = FinishReason.TOOL_USE if self._tools else FinishReason.STOP
        return StepResult(finish, self._blocks, {k: self._usage.get(k) for k in USAGE_KEYS})


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
