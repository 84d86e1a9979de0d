"""A background run's result: its stored log folded into the non-streamed message JSON, plus its status.

While the run is active the result holds what exists so far. Usage is never null: a run
that ended (cancelled, failed, cut off) before its provider reported the last step's
usage counts that step's streamed deltas as its completion tokens.
"""

from __future__ import annotations

from typing import Any

from .folding import MessageFolder
from .store import RunRecord, StreamStore
from .usage import USAGE_KEYS, add_usage

READ_BATCH = 512
DELTA_EVENTS = frozenset({"text_delta", "thinking_delta", "tool_call_delta"})
_OPENS = {
    "text_start": lambda f: {"type": "text"},
    "thinking_start": lambda f: {"type": "thinking"},
    "tool_call_start": lambda f: {"type": "tool_use", "id": f.get("tool_call_id"), "name": f.get("name"), "input": {}},
}
_COMPLETES = frozenset({"text_complete", "thinking_complete", "tool_call_complete"})


class ResultFolder(MessageFolder):
    """`MessageFolder`, plus the usage of the steps seen so far (for a run without a final usage)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = False
        self.steps_usage: dict[str, Any] = dict.fromkeys(USAGE_KEYS)
        self.open_step_deltas = 0  # deltas of a step that has no step_finish (yet)
        self.open_block: dict[str, Any] | None = None  # a block begun but not completed (yet)
        self._parts: list[str] = []

    def track(self, type: str, fields: dict[str, Any]) -> None:
        if type in DELTA_EVENTS:
            self.open_step_deltas += 1
            self._parts.append(fields.get("delta") or "")
        elif type in _OPENS:
            self.open_block, self._parts = _OPENS[type](fields), []
        elif type in _COMPLETES:
            self.open_block, self._parts = None, []
        elif type == "step_start":
            self.open_step_deltas = 0
        elif type == "step_finish":
            add_usage(self.steps_usage, fields.get("usage") or {})
            self.open_step_deltas = 0
        elif type == "stream_end":
            self.ended = True

    def partial_block(self) -> dict[str, Any] | None:
        """The open block with what it holds so far (tool input as the partial JSON text)."""
        if self.open_block is None:
            return None
        block, text = dict(self.open_block), "".join(self._parts)
        if block["type"] == "tool_use":
            block["partial_input"] = text
        else:
            block[block["type"]] = text
        return block

    def total_usage(self) -> dict[str, Any]:
        """The final usage where the log has one; else (or for the counts it lacks) the steps so far.

        Prompt and completion tokens are never null: a step cut off before its provider reported
        usage counts its streamed deltas as completion tokens, and an unknown prompt counts 0.
        """
        final = self.usage if self.ended and isinstance(self.usage, dict) else {}
        out = {key: final.get(key) if final.get(key) is not None else self.steps_usage.get(key) for key in USAGE_KEYS}
        if final.get("completion_tokens") is None:
            out["completion_tokens"] = (self.steps_usage.get("completion_tokens") or 0) + self.open_step_deltas
        out["prompt_tokens"] = out["prompt_tokens"] or 0
        return out


async def fold_result(store: StreamStore, record: RunRecord) -> dict[str, Any]:
    """The run's message as `POST /v1/messages` answers it, with `status`; reads the log in batches."""
    folder = ResultFolder()
    cursor = 0
    # A finished run's log is read from the backend (another replica may have written its end).
    read = store.read_stored if record.terminal else store.read
    while True:
        batch = await read(record.tenant, record.message_id, cursor, READ_BATCH)
        if not batch:
            break
        for event in batch:
            folder.feed(event)
            folder.track(event.type, event.load())
        cursor = batch[-1].seq
    message = folder.message(record.message_id)
    partial = folder.partial_block()
    if partial is not None:  # cut off mid-block (active, cancelled or failed): keep what was streamed
        message["content"] = [*message["content"], partial]
    message["usage"] = folder.total_usage()
    if not folder.ended:
        message["finish_reason"] = None  # not over yet (or cut off before its end was written)
        message["model"] = message["model"] or record.model or None
    message["status"] = record.status
    return message
