"""The `StreamStore` interface and what all backends share: the live tail and waking watchers.

A backend implements durable I/O (`_persist`, `_load_events`, the run record
methods). The base keeps, for runs appended by this process, the recent events
in memory with their SSE frames already built, so a thousand watchers of a
thousand runs cost one serialisation per event and no extra reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..events import Event

TERMINAL = frozenset({"completed", "failed", "cancelled", "error"})
STATUSES = ("pending", "processing", *sorted(TERMINAL))
Key = tuple[str, str]  # (tenant, message_id)

TAIL_MAX = 8192  # events per run kept in memory; older ones are read from the backend


class FencedOut(Exception):
    """This process no longer owns the run: another one took it over."""


@dataclass
class RunRecord:
    tenant: str
    message_id: str
    status: str = "pending"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    error_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    request: bytes = b""  # the validated request as JSON, so another process can (re)start the run
    priority: int = 0
    model: str = ""
    owner: str = ""  # the process executing it
    principal: str = ""  # who started it (API key or token subject), for per-key limits
    expires_at: float | None = None
    event_count: int = 0

    @property
    def key(self) -> Key:
        return (self.tenant, self.message_id)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def changed(self, **changes: Any) -> RunRecord:
        return replace(self, **changes)


RECORD_FIELDS = tuple(f.name for f in fields(RunRecord))


class _Tail:
    __slots__ = ("events", "last_seq", "waiters", "ended")

    def __init__(self, last_seq: int = 0) -> None:
        self.events: list[Event] = []
        self.last_seq = last_seq
        self.waiters: list[asyncio.Future[None]] = []
        self.ended = False

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Until the next wake(); False on timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            if fut in self.waiters:
                self.waiters.remove(fut)
            return False


class StreamStore:
    """Runs and their append-only event logs. All methods are scoped by tenant."""

    name = "base"

    def __init__(self) -> None:
        self._tails: dict[Key, _Tail] = {}

    # --- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> str | None:
        """Readiness: None when usable, else a reason."""
        return None

    # --- ownership (fencing matters only when several processes share a store) ----
    async def claim(self, tenant: str, message_id: str) -> int:
        """Become the only writer of a run; returns the fencing token."""
        return 0

    def release(self, tenant: str, message_id: str) -> None:
        return None

    def wake(self, tenant: str, message_id: str) -> None:
        """Wake a run's watchers so they re-check it (it was deleted elsewhere)."""
        self._drop_tail((tenant, message_id))

    # --- run records (backend) ---------------------------------------------------
    async def create_run(self, record: RunRecord) -> bool:
        """Insert a new run; False if that id already exists for the tenant."""
        raise NotImplementedError

    async def get_run(self, tenant: str, message_id: str) -> RunRecord | None:
        raise NotImplementedError

    async def update_run(self, tenant: str, message_id: str, **changes: Any) -> None:
        raise NotImplementedError

    async def unfinished(self) -> list[RunRecord]:
        """Runs left pending or processing (for recovery after a restart)."""
        raise NotImplementedError

    async def _delete(self, key: Key) -> bool:
        raise NotImplementedError

    async def _expire(self, now: float) -> list[Key]:
        raise NotImplementedError

    async def _persist(self, key: Key, events: Sequence[Event]) -> None:
        raise NotImplementedError

    async def _load_events(self, key: Key, after: int, limit: int) -> list[Event]:
        raise NotImplementedError

    async def _last_seq(self, key: Key) -> int:
        raise NotImplementedError

    # --- events (shared) ----------------------------------------------------------
    async def append(self, tenant: str, message_id: str, events: Sequence[Event]) -> None:
        """Make events durable, then visible to watchers. One caller per run; order is kept."""
        if not events:
            return
        key = (tenant, message_id)
        await self._persist(key, events)
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = _Tail(events[0].seq - 1)
        for e in events:
            e.fields = None  # the bytes are the record; keep memory per event small
            e.frame_bytes()
        tail.events.extend(events)
        if len(tail.events) > TAIL_MAX:
            del tail.events[: len(tail.events) - TAIL_MAX // 2]
        tail.last_seq = events[-1].seq
        if events[-1].type == "stream_end":
            tail.ended = True
        tail.wake()

    async def read(self, tenant: str, message_id: str, after: int = 0, limit: int = 512) -> list[Event]:
        """Events with position > after, oldest first, at most `limit`."""
        key = (tenant, message_id)
        tail = self._tails.get(key)
        if tail is not None and tail.events and tail.events[0].seq <= after + 1:
            start = after + 1 - tail.events[0].seq
            return tail.events[start : start + limit]
        if tail is not None and tail.last_seq <= after:
            return []
        return await self._load_events(key, after, limit)

    async def wait(self, tenant: str, message_id: str, after: int, timeout: float) -> bool:
        """Wait until an event past `after` may exist, the run is deleted, or timeout. False on timeout."""
        key = (tenant, message_id)
        tail = self._tails.get(key)
        if tail is None:
            last = await self._last_seq(key)
            # An append may have created the tail while we were reading: never replace it,
            # or watchers already waiting on it would not be woken.
            tail = self._tails.setdefault(key, _Tail(last))
        if tail.last_seq > after:
            return True
        return await tail.wait(timeout)

    async def last_seq(self, tenant: str, message_id: str) -> int:
        """Position of the last durable event (0: none yet)."""
        tail = self._tails.get((tenant, message_id))
        if tail is not None and tail.last_seq:
            return tail.last_seq
        return await self._last_seq((tenant, message_id))

    async def delete_run(self, tenant: str, message_id: str) -> bool:
        key = (tenant, message_id)
        deleted = await self._delete(key)
        self._drop_tail(key)
        return deleted

    async def expire(self, now: float | None = None) -> int:
        """Remove finished runs whose retention has passed; returns how many."""
        keys = await self._expire(time.time() if now is None else now)
        for key in keys:
            self._drop_tail(key)
        return len(keys)

    def forget(self, tenant: str, message_id: str) -> None:
        """Drop the in-memory tail of a finished run (its events stay in the backend)."""
        tail = self._tails.get((tenant, message_id))
        if tail is not None and not tail.waiters:
            del self._tails[(tenant, message_id)]

    def _drop_tail(self, key: Key) -> None:
        tail = self._tails.pop(key, None)
        if tail is not None:
            tail.wake()  # watchers re-check, find the run gone, and close
