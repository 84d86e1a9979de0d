"""Watching a run: replay its log from a cursor, follow it live, and stop only where the contract says.

The HTTP surface frames these bytes as an SSE response; the store does the waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from ..events import Event
from ..store import StreamStore

READ_BATCH = 512
WAIT_S = 5.0  # how long a watcher waits before re-checking that its run still exists
OUTAGE_MAX_S = 30.0  # a watcher waits this long for an unreachable store before giving up


Encode = Callable[[Event], bytes]


async def follow_run(
    store: StreamStore, tenant: str, message_id: str, cursor: int, encode: Encode = Event.frame_bytes
) -> AsyncIterator[bytes]:
    """Replay then follow a run; the frames of one read go out in one write.

    `encode` turns each event into the bytes sent: the native SSE frame, or a wire
    dialect's rendering (which may be empty for events the dialect does not show).

    Invariant: the stream closes cleanly only after the run's stream_end, after a delete,
    or at shutdown while the run goes on (elsewhere or after the restart), so a client
    that got no stream_end knows to resume. The run record is only consulted when a read
    comes back empty for a reason other than "caught up with a live run": the first time,
    after a wake-up that brought nothing (deletion, takeover), and after a quiet WAIT_S.
    """
    with store.watching(tenant, message_id):  # the run's tail stays in memory while it is watched
        outage = OutageBackoff(store)
        check = True
        while True:
            try:
                batch = await store.read(tenant, message_id, cursor, READ_BATCH)
                if not batch:
                    if store.closing:
                        return
                    if check:
                        ended, rest = await _ended(store, tenant, message_id, cursor, encode)
                        if ended:
                            if rest:
                                yield rest
                            return
                    await store.wait(tenant, message_id, cursor, WAIT_S)
                    check = True  # a read right after a real wake-up has events, which clears this again
                    continue
            except Exception as exc:
                await outage.pause(exc)
                continue
            outage.over()
            cursor = batch[-1].seq
            frames = b"".join(encode(e) for e in batch)
            if frames:
                yield frames
            if batch[-1].type == "stream_end":
                return
            check = False


async def _ended(store: StreamStore, tenant: str, message_id: str, cursor: int, encode: Encode) -> tuple[bool, bytes]:
    """Whether the watch is over (run deleted or terminal), and the frames left to send if so."""
    record = await store.get_run(tenant, message_id)
    if record is None:
        return True, b""
    if not record.terminal:
        return False, b""
    # The status is written only after stream_end is durable. Read the rest from the store itself:
    # this process's copy of the log may stop where another replica took the run over.
    frames: list[bytes] = []
    while True:
        batch = await store.read_stored(tenant, message_id, cursor, READ_BATCH)
        if not batch:
            return True, b"".join(frames)
        cursor = batch[-1].seq
        frames.extend(encode(e) for e in batch)


class OutageBackoff:
    """A watcher rides out a store outage (a Redis restart) with backoff; keep-alives go on meanwhile."""

    def __init__(self, store: StreamStore) -> None:
        self.store = store
        self.since: float | None = None
        self.pause_s = 0.05

    async def pause(self, exc: Exception) -> None:
        now = time.monotonic()
        if not self.store.unavailable(exc):
            raise exc
        self.since = self.since or now
        if now - self.since > OUTAGE_MAX_S:
            raise exc
        await asyncio.sleep(self.pause_s)
        self.pause_s = min(1.0, self.pause_s * 2)

    def over(self) -> None:
        self.since = None
        self.pause_s = 0.05
