"""The stream store: background runs and their event logs, behind one small interface.

Backends: `memory` (tests, throwaway), `sqlite` (the embedded default), `redis`
(several replicas). Watchers read only from the store; an event becomes visible
to them only after the backend has made it durable.
"""

from __future__ import annotations

from ..config import Settings
from .base import TERMINAL, FencedOut, RunRecord, StreamStore


def create_store(settings: Settings) -> StreamStore:
    if settings.store == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if settings.store == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore(settings.data_path / "backstream.db")
    from .redis import RedisStore

    return RedisStore(settings.redis.url, settings.redis.key_prefix, settings.runs.max_events)


__all__ = ["TERMINAL", "FencedOut", "RunRecord", "StreamStore", "create_store"]
