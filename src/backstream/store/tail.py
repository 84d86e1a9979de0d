"""The in-memory tail of a run's log: recent durable events, their watchers, and waking them.

A store keeps one per run it writes or that has watchers in this process, so a
thousand watchers of a run share one read and one SSE frame per event. What the
tails hold is counted in bytes (`Tail.bytes`) so the store can keep all of them
within one budget (`runs.tail_cache_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import Sequence

from ..events import Event

TAIL_MAX = 8192  # events per run kept in memory; older ones are read from the backend
# What a cached event costs beyond its JSON: the Event object, the headers of its two bytes
# objects (the data, and the SSE frame its first watcher builds), the frame's `id:`/`event:` head.
EVENT_OVERHEAD = 200


def cost(events: Sequence[Event]) -> int:
    """Bytes a tail holds for these events: the JSON twice (data and frame) plus the overhead."""
    return sum(2 * len(e.data) + EVENT_OVERHEAD for e in events)


class Tail:
    """Recent events of one run (newest last), the position of its last durable event, and who waits for the next."""

    __slots__ = ("events", "last_seq", "_waiters", "ended", "done", "bytes")

    def __init__(self, last_seq: int = 0) -> None:
        self.events: list[Event] = []
        self.last_seq = last_seq
        self._waiters: list[tuple[asyncio.Future[bool], float]] = []  # (future, deadline for the sweep)
        self.ended = False  # its stream_end was published
        self.done = False  # this process writes no more of it (ended here, or left to another)
        self.bytes = 0  # what `events` costs (see cost())

    @property
    def watched(self) -> bool:
        """Somebody waits on it now (a tail with watchers must not be replaced or forgotten)."""
        return bool(self._waiters)

    def publish(self, events: Sequence[Event]) -> int:
        """Durable events become visible: appended (oldest trimmed), watchers woken. Returns the change in `bytes`."""
        for e in events:
            e.fields = None  # the bytes are the record; keep memory per event small
        self.events.extend(events)
        added = cost(events)
        if len(self.events) > TAIL_MAX:
            cut = len(self.events) - TAIL_MAX // 2
            added -= cost(self.events[:cut])
            del self.events[:cut]
        self.bytes += added
        self.last_seq = events[-1].seq
        if events[-1].type == "stream_end":
            self.ended = True
        self.wake()
        return added

    def clear(self) -> int:
        """Let go of the cached events (readers fall back to the backend); returns the bytes freed."""
        freed, self.bytes = self.bytes, 0
        self.events = []
        return freed

    def advance(self, last_seq: int) -> None:
        """Events up to `last_seq` exist elsewhere (another replica wrote them): wake watchers to read them."""
        self.last_seq = max(self.last_seq, last_seq)
        self.wake()

    def after(self, after: int, limit: int) -> list[Event] | None:
        """Events with position > after if this tail still holds them all; None when it does not reach back that far."""
        if self.events and self.events[0].seq <= after + 1:
            start = after + 1 - self.events[0].seq
            return self.events[start : start + limit]
        if self.last_seq <= after:
            return []
        return None

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w, _ in waiters:
            if not w.done():
                w.set_result(True)

    def expire(self, now: float) -> bool:
        """Time out waits whose deadline has passed; whether any wait is left."""
        for w, deadline in self._waiters:
            if deadline <= now:
                _time_out(w)
        return bool(self._waiters)

    async def wait(self, timeout: float) -> bool:
        """Until the next wake(); False on timeout.

        Every watcher of every run waits once per event, so long waits (watchers re-check their
        run every few seconds) get no timer of their own: one sweep per loop times them out,
        up to SWEEP_S late. A timer costs about 2 us to arm and cancel; at 40,000 waits per
        second that was 7% of a core.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        timer = None
        if timeout < COARSE_AFTER_S:
            entry = (fut, math.inf)
            timer = loop.call_later(timeout, _time_out, fut)
        else:
            entry = (fut, loop.time() + timeout)
            _sweeper(loop).watch(self)
        self._waiters.append(entry)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            if not fut.done() or fut.result() is False:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)


def _time_out(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


COARSE_AFTER_S = 2.0  # waits at least this long are timed out by the sweep
SWEEP_S = 0.5


class _Sweeper:
    """Times out the long waits of one event loop: one timer every SWEEP_S while a tail has waiters."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tails: set[Tail] = set()
        self.armed = False

    def watch(self, tail: Tail) -> None:
        self.tails.add(tail)
        if not self.armed:
            self.armed = True
            self.loop.call_later(SWEEP_S, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        self.tails = {tail for tail in self.tails if tail.expire(now)}
        self.armed = bool(self.tails)
        if self.armed:
            self.loop.call_later(SWEEP_S, self.sweep)


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = weakref.WeakKeyDictionary()


def _sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    sweeper = _sweepers.get(loop)
    if sweeper is None:
        sweeper = _sweepers[loop] = _Sweeper(loop)
    return sweeper
