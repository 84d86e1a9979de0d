"""How a background run ends, whoever ends it: the run itself, recovery after a restart,
a takeover by another replica, or a cancel of a run nobody executes.

The invariant: a run's log ends with exactly one `stream_end`, and its terminal status
is written after that event is durable and agrees with it. So an ending first looks
at the stored log: if a `stream_end` is already there (a process died between the
final event and the status), only the status is finished; otherwise the fallback
`stream_end` is appended after the log's real last event.
"""

from __future__ import annotations

import time
from typing import Any

from .events import Event
from .store import RunRecord, StreamStore
from .tools import redact_stored_request


def status_of_end(end: dict[str, Any]) -> tuple[str, str | None]:
    """Terminal status and error message that a stored `stream_end` implies."""
    reason = end.get("finish_reason")
    if reason == "Cancelled":
        return "cancelled", None
    if reason == "Error":
        error = end.get("error") or {}
        return ("error" if error.get("type") == "api_error" else "failed"), error.get("message")
    return "completed", None


def fallback_end(seq: int, message_id: str, finish_reason: str, error: dict[str, str] | None, usage: dict[str, Any] | None) -> Event:
    fields: dict[str, Any] = {"finish_reason": finish_reason, "usage": usage or {}, "citations": None}
    if error is not None:
        fields["error"] = error
    return Event.build(seq, "stream_end", message_id, **fields)


async def end_run(
    store: StreamStore,
    record: RunRecord,
    retention_s: float,
    *,
    known_end: Event | None = None,
    finish_reason: str = "Error",
    error: dict[str, str] | None = None,
    usage: dict[str, Any] | None = None,
) -> str:
    """Give a run its one `stream_end` (unless the log has it) and the status it implies; returns the status.

    `known_end` is the run's own stream_end when the caller knows it is durable (saves a read).
    The caller must own the run (fencing): the status write raises FencedOut otherwise.
    """
    end = known_end
    if end is None:
        last = await store.last_event(*record.key)
        if last is not None and last.type == "stream_end":
            end = last
        else:
            end = fallback_end((last.seq if last else 0) + 1, record.message_id, finish_reason, error, usage)
            await store.append(*record.key, [end])
    data = end.load()
    status, message = status_of_end(data)
    now = time.time()
    metadata = {**record.metadata, "event_count": end.seq, "usage": data.get("usage") or usage}
    await store.update_run(
        *record.key,
        status=status,
        updated_at=now,
        completed_at=now,
        error_message=message,
        expires_at=now + retention_s,
        event_count=end.seq,
        metadata=metadata,
        request=redact_stored_request(record.request),  # an ended run never starts again: drop its secrets
    )
    return status
