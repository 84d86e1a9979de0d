"""The `StreamStore` interface and what all backends share: the live tail and waking watchers.

A backend implements durable I/O (`_persist`, `_load_events`, the run record
methods). The base keeps, for runs appended by this process, the recent events
in memory with their SSE frames already built, so a thousand watchers of a
thousand runs cost one serialisation per event and no extra reads.

Those tails are a cache, never the record: a run's tail goes once the run is over
here and its last watcher has left (later replays read the backend), and all tails
together stay within a byte budget (`tail_cache_bytes`, from `runs.tail_cache_bytes`):
past it, the least recently published tails let go of their events, those nobody
watches first. A watcher whose cursor is older than what its tail holds reads the
backend, so dropping events from a tail never hides one from anybody.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .. import metrics
from ..events import Event
from ..redis_keys import Key
from ..statuses import TERMINAL, RunStatus
from .tail import Tail

TAIL_CACHE_BYTES = 64 * 1024 * 1024  # default of runs.tail_cache_bytes
EVICT_TO = 0.75  # an eviction frees down to this share of the budget, so it runs rarely


class FencedOut(Exception):
    """This process no longer owns the run: another one took it over."""


@dataclass
class RunRecord:
    """A background run as stored: status, metadata, and the request to (re)start it from."""

    tenant: str
    message_id: str
    status: str = RunStatus.PENDING
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


@dataclass(frozen=True)
class RunQuery:
    """Which runs a listing wants: filters, a keyset cursor and a page size.

    Order is newest first, ties broken by message_id (descending), so a page that starts strictly
    after `before` = (created_at, message_id) of the last run seen neither repeats nor skips older
    runs when new ones are inserted or others deleted between pages.
    """

    status: str | None = None
    model: str | None = None
    created_after: float | None = None  # created_at >= this (unix seconds)
    created_before: float | None = None  # created_at < this
    before: tuple[float, str] | None = None
    limit: int = 20

    def matches(self, record: RunRecord) -> bool:
        """Whether a record passes the filters and comes after the cursor (for backends that scan)."""
        if self.status is not None and record.status != self.status:
            return False
        if self.model is not None and record.model != self.model:
            return False
        if self.created_after is not None and record.created_at < self.created_after:
            return False
        if self.created_before is not None and record.created_at >= self.created_before:
            return False
        return self.before is None or (record.created_at, record.message_id) < self.before


class StreamStore:
    """Runs and their append-only event logs. All methods are scoped by tenant."""

    name = "base"
    # Backend errors that mean "the store cannot be reached now" (the edge answers 503, callers retry).
    unavailable_errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self.closing = False  # shutting down: watchers of runs that go on elsewhere are let go
        # Ordered least recently published first (publishing moves a tail to the end): the eviction order.
        self._tails: dict[Key, Tail] = {}
        self.tail_cache_bytes = TAIL_CACHE_BYTES  # budget for what all tails hold (see tail.cost)
        self.cached_bytes = 0  # what they hold now
        self._watchers: dict[Key, int] = {}  # watch streams open in this process, per run
        self._pending: list[tuple[Key, Event]] = []
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._failures: dict[Key, Exception] = {}
        self._flusher: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> str | None:
        """Readiness: None when usable, else a reason."""
        return None

    def unavailable(self, exc: BaseException) -> bool:
        """True when `exc` says the store is out of reach (retry later), not that a request was wrong."""
        return isinstance(exc, self.unavailable_errors)

    def close_watchers(self) -> None:
        """Shutdown: wake every watcher; those of runs not ended here close cleanly and resume elsewhere."""
        self.closing = True
        for key in list(self._tails):
            self._drop_tail(key)

    # --- ownership (fencing matters only when several processes share a store) ----
    async def claim(self, tenant: str, message_id: str) -> int:
        """Become the only writer of a run; returns the fencing token.

        The new writer appends after the log's real last event, so whatever this process
        kept in memory about the run (a watcher's tail) is dropped: it may be behind.
        """
        self._drop_tail((tenant, message_id))
        return 0

    def release(self, tenant: str, message_id: str) -> None:
        """The run has ended here (or left this process): forget what was kept for writing it.

        Its tail stays only while watchers are attached (the last one to leave drops it);
        whoever replays the run later reads it from the backend.
        """
        key = (tenant, message_id)
        self._failures.pop(key, None)
        tail = self._tails.get(key)
        if tail is not None:
            tail.done = True
            if key not in self._watchers and not tail.watched:
                self._drop_tail(key)

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

    async def list_runs(self, tenant: str, query: RunQuery) -> list[RunRecord]:
        """A tenant's runs matching `query`, newest first (ties: larger id first), after its keyset cursor.

        Records may come without `request` (listing never needs it)."""
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

    async def _last_event(self, key: Key) -> Event | None:
        raise NotImplementedError

    # --- events (shared) ----------------------------------------------------------
    async def append(self, tenant: str, message_id: str, events: Sequence[Event]) -> None:
        """Make events durable now, then visible to watchers (for writes outside a running run)."""
        if not events:
            return
        key = (tenant, message_id)
        await self._persist(key, events)
        self._publish(key, events)

    def enqueue(self, tenant: str, message_id: str, event: Event) -> None:
        """Buffer a running run's event for the next group commit, which writes the events of every
        run in one go; watchers see it once that commit is durable. Raises if storing this run failed."""
        key = (tenant, message_id)
        failure = self._failures.get(key)
        if failure is not None:
            raise failure
        self._pending.append((key, event))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_pending())

    async def sync(self, tenant: str, message_id: str) -> None:
        """Wait until every event enqueued so far is durable; raise if this run's were not stored."""
        key = (tenant, message_id)
        if self._pending or (self._flusher is not None and not self._flusher.done()):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._sync_waiters.append(fut)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.get_running_loop().create_task(self._flush_pending())
            await fut
        failure = self._failures.get(key)
        if failure is not None:
            raise failure

    async def _flush_pending(self) -> None:
        # While one commit is in flight new events pile up; the next commit takes them all.
        while self._pending or self._sync_waiters:
            batch, self._pending = self._pending, []
            waiters, self._sync_waiters = self._sync_waiters, []
            if batch:
                grouped: dict[Key, list[Event]] = {}
                for key, event in batch:
                    # After a failed commit a run writes nothing more: a later batch would leave a gap.
                    if key not in self._failures:
                        grouped.setdefault(key, []).append(event)
                flush_started = time.monotonic()
                try:
                    failures = await self._persist_many(grouped) if grouped else {}
                except Exception as exc:  # the whole commit failed
                    failures = dict.fromkeys(grouped, exc)
                metrics.STORE_FLUSH_SECONDS.observe(time.monotonic() - flush_started)  # once per group commit
                for key, events in grouped.items():
                    if key in failures:
                        self._failures[key] = failures[key]
                    elif key not in self._failures:
                        self._publish(key, events)
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _persist_many(self, grouped: dict[Key, list[Event]]) -> dict[Key, Exception]:
        """Store the events of several runs; backends that can write them at once override this."""
        failures: dict[Key, Exception] = {}
        for key, events in grouped.items():
            try:
                await self._persist(key, events)
            except Exception as exc:
                failures[key] = exc
        return failures

    def _publish(self, key: Key, events: Sequence[Event]) -> None:
        """Durable events become visible: into the tail (the first watcher builds each frame, all share it), watchers woken."""
        tails = self._tails
        tail = tails.pop(key, None)  # re-inserted last: the most recently published
        if tail is None:
            tail = Tail(events[0].seq - 1)
        tails[key] = tail
        self.cached_bytes += tail.publish(events)
        if self.cached_bytes > self.tail_cache_bytes:
            self._evict()

    def _evict(self) -> None:
        """Over the budget: the least recently published tails let go of their events, down to EVICT_TO of it.

        Tails nobody watches go first (an ended one entirely), then any. A tail that keeps its
        watchers keeps its position and waiters; they read what it no longer holds from the backend.
        """
        target = int(self.tail_cache_bytes * EVICT_TO)
        for idle_only in (True, False):
            for key, tail in list(self._tails.items()):
                if self.cached_bytes <= target:
                    return
                watched = key in self._watchers or tail.watched
                if idle_only and watched:
                    continue
                if (tail.done or tail.ended) and not watched:
                    self._drop_tail(key)
                else:
                    self.cached_bytes -= tail.clear()

    @contextlib.contextmanager
    def watching(self, tenant: str, message_id: str) -> Iterator[None]:
        """Around one watch stream: a run's tail is kept while somebody watches it, and dropped when
        the last watcher of a run that is over here (or whose tail holds nothing) leaves."""
        key = (tenant, message_id)
        self._watchers[key] = self._watchers.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._watchers.pop(key) - 1
            if left:
                self._watchers[key] = left
            else:
                tail = self._tails.get(key)
                if tail is not None and not tail.watched and (tail.done or tail.ended or not tail.events):
                    self._drop_tail(key)

    async def read(self, tenant: str, message_id: str, after: int = 0, limit: int = 512) -> list[Event]:
        """Events with position > after, oldest first, at most `limit`."""
        key = (tenant, message_id)
        tail = self._tails.get(key)
        if tail is not None:
            held = tail.after(after, limit)
            if held is not None:
                return held
        return await self._load_events(key, after, limit)

    async def read_stored(self, tenant: str, message_id: str, after: int = 0, limit: int = 512) -> list[Event]:
        """Like read(), but always from the backend: the log as every process sees it."""
        return await self._load_events((tenant, message_id), after, limit)

    async def last_event(self, tenant: str, message_id: str) -> Event | None:
        """The log's last durable event, read from the backend (never from this process's memory)."""
        return await self._last_event((tenant, message_id))

    async def wait(self, tenant: str, message_id: str, after: int, timeout: float) -> bool:
        """Wait until an event past `after` may exist, the run is deleted, or timeout. False on timeout."""
        key = (tenant, message_id)
        if self.closing:
            return True  # the watcher re-reads, sees the store closing, and lets its client resume elsewhere
        tail = self._tails.get(key)
        if tail is None:
            last = await self._last_seq(key)
            # An append may have created the tail while we were reading: never replace it,
            # or watchers already waiting on it would not be woken.
            tail = self._tail_for(key, last)
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

    def _tail_of(self, key: Key) -> Tail | None:
        """This process's tail of a run, if it keeps one (for backends that feed tails themselves)."""
        return self._tails.get(key)

    def _tail_for(self, key: Key, last_seq: int) -> Tail:
        """The run's tail, created at `last_seq` if there is none; an existing one is never replaced (its watchers wait on it)."""
        return self._tails.setdefault(key, Tail(last_seq))

    def _drop_tail(self, key: Key) -> None:
        tail = self._tails.pop(key, None)
        if tail is not None:
            self.cached_bytes -= tail.bytes
            tail.wake()  # watchers re-check, find the run gone, and close
