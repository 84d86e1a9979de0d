"""The in-memory tail of a run's log: recent durable events, their watchers, and waking them.

A store keeps one per run it writes or that has watchers in this process, so a
thousand watchers of a run share one read and one SSE frame per event. What the
tails hold is counted in bytes (`Tail.bytes`) so the store can keep all of them
within one budget (`runs.tail_cache_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._waiters: list[asyncio.Future[bool]] = []
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
        for w in waiters:
            if not w.done():
                w.set_result(True)

    async def wait(self, timeout: float) -> bool:
        """Until the next wake(); False on timeout.

        One future and one timer per wait (asyncio.wait_for costs several more objects,
        and every watcher of every run waits once per event).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(timeout, _time_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            if not fut.done() or fut.result() is False:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)


def _time_out(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
