"""Folds a run's events into the non-streamed message JSON (`POST /v1/messages` without `stream`)."""

from __future__ import annotations

from typing import Any

from .events import Event
from .statuses import FinishReason
from .usage import empty_usage


class MessageFolder:
    """Collects a run's completed blocks and its ending, event by event, into one message."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.model = ""
        self.provider = ""
        self.finish_reason: str = FinishReason.STOP
        self.usage: dict[str, Any] = empty_usage()
        self.error: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self.citations: list[dict[str, Any]] | None = None

    def feed(self, event: Event) -> None:
        f = event.load()
        t = event.type
        if t == "text_complete":
            block: dict[str, Any] = {"type": "text", "text": f["text"]}
            if f.get("citations"):  # the search results this block draws on (built-in tools, citations on)
                block["citations"] = f["citations"]
            self.content.append(block)
        elif t == "thinking_complete":
            block = {"type": "thinking", "thinking": f["thinking"]}
            if f.get("signature"):
                block["signature"] = f["signature"]
            self.content.append(block)
        elif t == "tool_call_complete":
            self.content.append({"type": "tool_use", "id": f["tool_call_id"], "name": f["name"], "input": f["input"]})
        elif t == "tool_result":
            self.content.append(
                {
                    "type": "tool_result",
                    "tool_use_id": f["tool_call_id"],
                    "content": f["content"],
                    "is_error": f["is_error"],
                }
            )
        elif t == "stream_start":
            self.model, self.provider = f["model"], f["provider"]
            self.warnings = (f.get("metadata") or {}).get("warnings") or []
        elif t == "stream_end":
            self.finish_reason = f["finish_reason"]
            self.usage = f["usage"]
            self.error = f.get("error")
            self.citations = f.get("citations") or None

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
            "citations": self.citations,
        }
        if self.warnings:
            out["warnings"] = self.warnings
        if self.error:
            out["error"] = self.error
        return out
