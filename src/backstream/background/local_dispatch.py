"""The embedded dispatcher (memory and SQLite stores): one process, every run starts at once.

A run then waits inside the run loop for its model's slot (`ModelSlots`: priority,
then arrival); the queue is this process's count of runs not yet started.
"""

from __future__ import annotations

from typing import Any

from ..statuses import FinishReason
from ..store import RunRecord, StreamStore
from .lifecycle import recover_unfinished
from .protocols import RunHost


class LocalDispatcher:
    """Launches runs in this process; after a restart, recovers the ones the store left unfinished."""

    def __init__(self, store: StreamStore, host: RunHost) -> None:
        self.store = store
        self.host = host

    async def start(self) -> None:
        await recover_unfinished(self.store, self.host)

    async def stop(self) -> None:
        return None

    async def enqueue(self, record: RunRecord, chat: Any, config: Any, limit: int | None = None) -> bool:
        # No await between the check and launch(), which counts the run: atomic on the event loop.
        if limit is not None and self.host.local_pending >= limit:
            return False
        self.host.launch(record, chat, config)
        return True

    async def hand_over(self, record: RunRecord) -> None:
        return None  # it stays pending in the store; recovery starts it with the server

    async def pending(self) -> int:
        return self.host.local_pending

    async def finished(self, record: RunRecord) -> None:
        return None

    async def cancel_elsewhere(self, record: RunRecord) -> None:
        # Nobody else can be executing it: end it here (a log that already ended keeps its ending).
        await self.host.end_orphan(record, FinishReason.CANCELLED, None)

    async def deleted(self, record: RunRecord) -> None:
        return None
