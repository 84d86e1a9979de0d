"""In-process store: nothing survives a restart. For tests and throwaway deployments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..events import Event
from .base import Key, RunQuery, RunRecord, StreamStore


class MemoryStore(StreamStore):
    """Runs and logs in dicts of this process: nothing survives a restart."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._runs: dict[Key, RunRecord] = {}
        self._events: dict[Key, list[Event]] = {}

    async def create_run(self, record: RunRecord) -> bool:
        if record.key in self._runs:
            return False
        self._runs[record.key] = record
        self._events[record.key] = []
        return True

    async def get_run(self, tenant: str, message_id: str) -> RunRecord | None:
        record = self._runs.get((tenant, message_id))
        return None if record is None else record.changed()

    async def update_run(self, tenant: str, message_id: str, **changes: Any) -> None:
        key = (tenant, message_id)
        if key in self._runs:
            self._runs[key] = self._runs[key].changed(**changes)

    async def unfinished(self) -> list[RunRecord]:
        return [r.changed() for r in self._runs.values() if not r.terminal]

    async def list_runs(self, tenant: str, query: RunQuery) -> list[RunRecord]:
        found = [r for r in self._runs.values() if r.tenant == tenant and query.matches(r)]  # a scan
        found.sort(key=lambda r: (r.created_at, r.message_id), reverse=True)
        return [r.changed() for r in found[: query.limit]]

    async def _delete(self, key: Key) -> bool:
        self._events.pop(key, None)
        return self._runs.pop(key, None) is not None

    async def _expire(self, now: float) -> list[Key]:
        keys = [k for k, r in self._runs.items() if r.expires_at is not None and r.expires_at <= now]
        for k in keys:
            await self._delete(k)
        return keys

    async def _persist(self, key: Key, events: Sequence[Event]) -> None:
        log = self._events.get(key)
        if log is not None:
            log.extend(events)

    async def _load_events(self, key: Key, after: int, limit: int) -> list[Event]:
        log = self._events.get(key, [])
        return log[after : after + limit]  # positions are 1, 2, 3 … with no gaps

    async def _last_seq(self, key: Key) -> int:
        return len(self._events.get(key, ()))

    async def _last_event(self, key: Key) -> Event | None:
        log = self._events.get(key)
        return log[-1] if log else None
