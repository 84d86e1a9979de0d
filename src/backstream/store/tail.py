"""The in-memory tail of a run's log: recent durable events, their watchers, and waking them.

A store keeps one per run it writes or that has watchers in this process, so a
thousand watchers of a run share one read and one SSE frame per event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

from ..events import Event

TAIL_MAX = 8192  # events per run kept in memory; older ones are read from the backend


class Tail:
    """Recent events of one run (newest last), the position of its last durable event, and who waits for the next."""

    __slots__ = ("events", "last_seq", "_waiters", "ended")

    def __init__(self, last_seq: int = 0) -> None:
        self.events: list[Event] = []
        self.last_seq = last_seq
        self._waiters: list[asyncio.Future[bool]] = []
        self.ended = False

    @property
    def watched(self) -> bool:
        """Somebody waits on it now (a tail with watchers must not be replaced or forgotten)."""
        return bool(self._waiters)

    def publish(self, events: Sequence[Event]) -> None:
        """Durable events become visible: appended (oldest trimmed), watchers woken."""
        for e in events:
            e.fields = None  # the bytes are the record; keep memory per event small
        self.events.extend(events)
        if len(self.events) > TAIL_MAX:
            del self.events[: len(self.events) - TAIL_MAX // 2]
        self.last_seq = events[-1].seq
        if events[-1].type == "stream_end":
            self.ended = True
        self.wake()

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
