"""How a background run ends, whoever ends it: the run itself, recovery after a restart,
a takeover by another replica, or a cancel of a run nobody executes; and retention.

The invariant: a run's log ends with exactly one `stream_end`, and its terminal status
is written after that event is durable and agrees with it. So an ending first looks
at the stored log: if a `stream_end` is already there (a process died between the
final event and the status), only the status is finished; otherwise the fallback
`stream_end` is appended after the log's real last event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..events import Event
from ..quotas import Quotas
from ..statuses import FinishReason, RunStatus
from ..store import RunRecord, StreamStore
from ..tools import redact_stored_request

if TYPE_CHECKING:
    from .protocols import RunHost

log = logging.getLogger("backstream.lifecycle")

CRASH_MESSAGE = "the server stopped while this run was in flight"

# Told of every run's ending, per store (deployment.py attaches the webhooks outbox). Called with the
# terminal record *before* the status write: a crash in between leaves the run unfinished, and whoever
# ends it again (recovery, a takeover) derives the same status from the same stored stream_end and
# tells the listener again, which must be idempotent. Its errors fail end_run like a failed status write.
RunEndListener = Callable[[RunRecord], Awaitable[None]]
_END_LISTENERS: weakref.WeakKeyDictionary[StreamStore, RunEndListener] = weakref.WeakKeyDictionary()


def on_run_end(store: StreamStore, listener: RunEndListener) -> None:
    _END_LISTENERS[store] = listener


def status_of_end(end: dict[str, Any]) -> tuple[RunStatus, str | None]:
    """Terminal status and error message that a stored `stream_end` implies."""
    reason = end.get("finish_reason")
    if reason == FinishReason.CANCELLED:
        return RunStatus.CANCELLED, None
    if reason == FinishReason.ERROR:
        error = end.get("error") or {}
        return (RunStatus.ERROR if error.get("type") == "api_error" else RunStatus.FAILED), error.get("message")
    return RunStatus.COMPLETED, None


def fallback_end(
    seq: int, message_id: str, finish_reason: str, error: dict[str, str] | None, usage: dict[str, Any] | None
) -> Event:
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
    finish_reason: str = FinishReason.ERROR,
    error: dict[str, str] | None = None,
    usage: dict[str, Any] | None = None,
) -> RunStatus:
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
    if (listener := _END_LISTENERS.get(store)) is not None:
        ended = dict(status=status, updated_at=now, completed_at=now, error_message=message, event_count=end.seq)
        await listener(record.changed(metadata=metadata, **ended))
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


async def end_orphan(
    store: StreamStore,
    quotas: Quotas,
    retention_s: float,
    record: RunRecord,
    finish_reason: str,
    error: dict[str, str] | None,
    claimed: bool = False,
) -> RunStatus:
    """End a run no task of ours is executing; returns its terminal status.

    If its log already ends with stream_end (its process died before writing the status),
    only the status is finished: a log never gets a second stream_end.
    """
    if not claimed:
        await store.claim(*record.key)
    try:
        usage = record.metadata.get("usage") or {}
        status = await end_run(store, record, retention_s, finish_reason=finish_reason, error=error, usage=usage)
        await quotas.release(record.principal, record.tenant, record.message_id)
        return status
    finally:
        store.release(*record.key)


async def recover_unfinished(store: StreamStore, host: RunHost) -> None:
    """After a restart: runs that never produced an event start again; runs cut off mid-stream end as error."""
    for record in await store.unfinished():
        if await store.last_event(*record.key) is None:
            await store.update_run(*record.key, status=RunStatus.PENDING, owner=host.owner, updated_at=time.time())
            host.launch_from_record(record.changed(owner=host.owner))
            log.info("run %s requeued after restart", record.message_id)
        else:
            status = await host.end_orphan(record, FinishReason.ERROR, {"type": "api_error", "message": CRASH_MESSAGE})
            log.warning("run %s was in flight when the server stopped; ended as %s", record.message_id, status)


async def expire_finished(store: StreamStore, retention_s: float) -> None:
    """Forever: remove finished runs whose retention has passed (backends without key expiry)."""
    interval = min(60.0, max(0.5, retention_s / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await store.expire()
            if removed:
                log.info("expired %d finished runs", removed)
        except Exception:
            log.exception("expiring runs failed")
