"""A run's statuses and a stream's finish reasons: the contract's words, as enums.

Both are `StrEnum`s, so they compare equal to, and serialise as, the plain strings on
the wire and in the stores.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a background run is: waiting, executing, or ended (the last four)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ERROR = "error"


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED, RunStatus.ERROR})


class FinishReason(StrEnum):
    """Why a step or a stream ended (`step_finish` and `stream_end` events)."""

    STOP = "Stop"
    LENGTH = "Length"
    STOP_SEQUENCE = "StopSequence"
    TOOL_USE = "ToolUse"
    CANCELLED = "Cancelled"
    ERROR = "Error"
