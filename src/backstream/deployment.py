"""The one place that chooses the deployment mode and builds what depends on it.

Embedded (store `memory` or `sqlite`): runs execute in this process as soon as they
are submitted, quotas are counted here. Redis (`redis`): store, quotas and the work
queue live in one Redis shared by replicas. Everything else sees only the results:
a `StreamStore`, `Quotas`, a `Dispatcher`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .background.executor import RunExecutor
from .background.lifecycle import expire_finished, on_run_end
from .background.protocols import Dispatcher
from .background.service import BackgroundRuns
from .config import Settings
from .model_table import ModelTable
from .quotas import Quotas, build_quotas
from .redis_keys import RedisKeys
from .store import StreamStore
from .webhooks import Webhooks, build_webhooks

RUN_INDEX_SLACK_S = 7 * 86400.0  # Redis listing index: members this long past retention are trimmed


@dataclass
class Deployment:
    """The store, quotas and background machinery of one server process, started and stopped together."""

    store: StreamStore
    quotas: Quotas
    executor: RunExecutor
    dispatcher: Dispatcher
    runs: BackgroundRuns
    retention_s: float
    webhooks: Webhooks | None = None
    _expiry: asyncio.Task[None] | None = field(default=None, repr=False)
    _drained: bool = field(default=False, repr=False)

    async def start(self) -> None:
        """After the store is open: the dispatcher (recovery, claims, leases), then retention."""
        if self.webhooks is not None:  # before recovery, which may end runs
            await self.webhooks.start()
            on_run_end(self.store, self.webhooks.run_ended)
        await self.dispatcher.start()
        self._expiry = asyncio.create_task(expire_finished(self.store, self.retention_s), name="runs:expiry")

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown, before connections close: running runs end with error (their watchers get
        stream_end); runs that had not started go back to the queue (a peer or the next start runs them);
        then every other watcher is let go cleanly, to resume elsewhere or after the restart."""
        self._drained = True
        if self._expiry is not None:
            self._expiry.cancel()
        await self.executor.stop_runs(timeout)
        await self.dispatcher.stop()
        if self.webhooks is not None:
            await self.webhooks.stop()
        self.store.close_watchers()

    async def stop(self) -> None:
        if not self._drained:
            await self.drain(10.0)


def build_deployment(settings: Settings, models: ModelTable) -> Deployment:
    if settings.store == "redis":
        return _redis(settings, models)
    return _embedded(settings, models)


def _embedded(settings: Settings, models: ModelTable) -> Deployment:
    from .background.local_dispatch import LocalDispatcher

    store: StreamStore
    if settings.store == "memory":
        from .store.memory import MemoryStore

        store = MemoryStore()
    else:
        from .store.sqlite import SQLiteStore

        store = SQLiteStore(settings.data_path / "backstream.db")
    quotas = build_quotas(settings)
    executor = RunExecutor(settings, store, models, quotas)
    deployment = _assemble(settings, store, quotas, executor, LocalDispatcher(store, executor))
    deployment.webhooks = build_webhooks(settings)
    return deployment


def _redis(settings: Settings, models: ModelTable) -> Deployment:
    from .background.redis_dispatch import RedisDispatcher
    from .store.redis import RedisStore

    keys = RedisKeys(settings.redis.key_prefix)
    store = RedisStore(settings.redis.url, settings.redis.key_prefix, settings.runs.max_events, keys=keys)
    store.index_horizon_s = settings.runs.retention_s + RUN_INDEX_SLACK_S
    quotas = build_quotas(settings, store.redis, keys)
    executor = RunExecutor(settings, store, models, quotas)
    deployment = _assemble(settings, store, quotas, executor, RedisDispatcher(settings, store, keys, executor))
    deployment.webhooks = build_webhooks(settings, store.redis)
    return deployment


def _assemble(
    settings: Settings, store: StreamStore, quotas: Quotas, executor: RunExecutor, dispatcher: Dispatcher
) -> Deployment:
    executor.queue = dispatcher
    store.tail_cache_bytes = settings.runs.tail_cache_bytes
    runs = BackgroundRuns(settings, store, quotas, executor, dispatcher)
    return Deployment(store, quotas, executor, dispatcher, runs, settings.runs.retention_s)
