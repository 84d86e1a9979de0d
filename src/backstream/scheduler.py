"""Background runs: start, cancel, delete, recover after a restart, expire.

A background run executes the same `Run.events()` as a synchronous request; its
sink is the store. Events are buffered and flushed by a per-run task so the run
loop never waits for a commit, and the store batches flushes across runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from . import metrics
from .config import ModelConfig, Settings
from .endings import end_run
from .engine import Run, RunOptions
from .limits import Quotas
from .errors import ApiError, not_found
from .events import Event, new_ulid
from .models import ModelTable
from .schema import ChatRequest
from .store import FencedOut, RunRecord, StreamStore
from .tools import redact_stored_request

log = logging.getLogger("backstream.scheduler")

FORGET_AFTER_S = 30.0  # keep a finished run's frames in memory this long for late watchers
CRASH_MESSAGE = "the server stopped while this run was in flight"
SHUTDOWN_MESSAGE = "the server shut down while this run was in flight"
STORE_FAILED_MESSAGE = "the server could not store this run's events"
RETRY_MAX_S = 2.0  # longest pause between tries to end a run while the store is out of reach


class LimitExceeded(Exception):
    pass


class _StoreSink:
    """Checks a run's caps and hands its events to the store's group commit."""

    def __init__(self, store: StreamStore, record: RunRecord, max_events: int, max_bytes: int) -> None:
        self.store = store
        self.tenant, self.message_id = record.key
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self.last: Event | None = None

    def add(self, event: Event) -> None:
        if event.type != "stream_end":
            if self.count + 1 >= self.max_events:
                raise LimitExceeded(f"the run exceeded runs.max_events ({self.max_events} events)")
            if self.bytes + len(event.data) > self.max_bytes:
                raise LimitExceeded(f"the run exceeded runs.max_bytes ({self.max_bytes} bytes)")
        self.store.enqueue(self.tenant, self.message_id, event)  # raises if storing failed (e.g. fenced out)
        self.count += 1
        self.bytes += len(event.data)
        self.last = event

    async def close(self) -> None:
        await self.store.sync(self.tenant, self.message_id)


class RunScheduler:
    def __init__(self, settings: Settings, store: StreamStore, models: ModelTable, quotas: Quotas) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.quotas = quotas
        self.options = RunOptions.from_settings(settings)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_ulid()}"
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._records: dict[tuple[str, str], RunRecord] = {}
        self._cancelling: set[tuple[str, str]] = set()
        self._abandoned: set[tuple[str, str]] = set()
        self._handed_over: set[tuple[str, str]] = set()
        self._pending = 0
        self._tool_setups = 0  # runs connecting to their MCP servers: not waiting in the queue (runs.queue_limit)
        self._sweeper: asyncio.Task[None] | None = None
        self.stopping = False
        if settings.store == "redis":
            from .dispatch import RedisDispatcher

            self.dispatcher: Any = RedisDispatcher(settings, store, self)  # type: ignore[arg-type]
        else:
            from .dispatch import LocalDispatcher

            self.dispatcher = LocalDispatcher(self)

    @property
    def local_pending(self) -> int:
        return self._pending - self._tool_setups

    def _count_tool_setup(self, busy: bool) -> None:
        self._tool_setups += 1 if busy else -1

    @property
    def active(self) -> int:
        return len(self._tasks)

    def local_records(self) -> list[RunRecord]:
        return list(self._records.values())

    async def start(self) -> None:
        await self.dispatcher.start()
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown, before connections close: running runs end with error (their watchers get
        stream_end); runs that had not started go back to the queue (a peer or the next start runs them);
        then every other watcher is let go cleanly, to resume elsewhere or after the restart."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.dispatcher.stop()
        self.store.close_watchers()

    async def stop(self) -> None:
        if not self.stopping:
            await self.drain(10.0)

    # --- submit and launch ---------------------------------------------------------
    async def submit(self, tenant: str, principal: str, message_id: str, chat: ChatRequest, config: ModelConfig, raw_request: bytes) -> RunRecord:
        pending = await self.dispatcher.pending()
        if pending >= self.settings.runs.queue_limit:
            raise ApiError(429, "rate_limit_error", f"the run queue is full ({pending} runs waiting); retry later", headers={"retry-after": "1"})
        if await self.store.get_run(tenant, message_id) is not None:
            raise ApiError(409, "conflict_error", f"a run with message_id {message_id!r} already exists")
        await self.quotas.acquire(principal, tenant, message_id, queued=True)
        now = time.time()
        record = RunRecord(
            tenant=tenant,
            message_id=message_id,
            created_at=now,
            updated_at=now,
            metadata=_metadata(chat, config),
            request=raw_request,
            priority=chat.priority,
            model=config.name,
            owner=self.owner,
            principal=principal,
        )
        if not await self.store.create_run(record):
            await self.quotas.release(principal, tenant, message_id)
            raise ApiError(409, "conflict_error", f"a run with message_id {message_id!r} already exists")
        # The queue limit is checked again where the run joins the queue, in one atomic step:
        # the check above is only a fast refusal, many starts can pass it at once.
        if not await self.dispatcher.enqueue(record, chat, config, limit=self.settings.runs.queue_limit):
            await self.store.delete_run(tenant, message_id)
            await self.quotas.release(principal, tenant, message_id)
            raise ApiError(429, "rate_limit_error", "the run queue is full; retry later", headers={"retry-after": "1"})
        return record

    def launch(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None:
        self._pending += 1
        metrics.RUNS_STARTED.labels("background", config.name).inc()
        task = asyncio.create_task(self._execute(record, chat, config), name=f"run:{record.message_id}")
        self._tasks[record.key] = task
        self._records[record.key] = record
        task.add_done_callback(lambda _t, key=record.key: self._forget_task(key))

    def launch_from_record(self, record: RunRecord) -> None:
        """Start a stored run (after a restart or a claim by another process)."""
        try:
            chat = ChatRequest.model_validate_json(record.request)
            config = self.models.resolve(chat.model)
        except (ValueError, ApiError) as exc:
            asyncio.get_running_loop().create_task(
                self.end_orphan(record, "Error", {"type": "api_error", "message": f"cannot start the run: {exc}"}, claimed=True)
            )
            return
        self.launch(record, chat, config)

    def _forget_task(self, key: tuple[str, str]) -> None:
        self._tasks.pop(key, None)
        self._records.pop(key, None)
        self._abandoned.discard(key)
        self._handed_over.discard(key)

    async def _execute(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None:
        runs = self.settings.runs
        run = Run(record.message_id, chat, self.models, config, self.options)
        run.on_tool_setup = self._count_tool_setup
        sink = _StoreSink(self.store, record, runs.max_events, runs.max_bytes)
        events = run.events()
        started = False
        try:
            try:
                async for event in events:
                    if not started:
                        started = True
                        self._pending -= 1
                        await self.quotas.started(record.principal, record.tenant, record.message_id)
                        metadata = {**record.metadata, "model": run.served_by.name, "provider": run.served_by.provider, "warnings": run.warnings}
                        record.metadata = metadata
                        # From its first event on a run is never started again: it needs no MCP token any more.
                        record.request = redact_stored_request(record.request)
                        await self.store.update_run(
                            *record.key, status="processing", updated_at=time.time(), metadata=metadata, request=record.request
                        )
                    sink.add(event)
            except LimitExceeded as exc:
                await events.aclose()
                sink.add(run.end_event("Error", {"type": "limit_exceeded", "message": str(exc)}))
        except asyncio.CancelledError:
            await events.aclose()
            if record.key in self._abandoned:
                pass
            elif self.stopping and record.key not in self._cancelling:
                if started:
                    sink.add(run.end_event("Error", {"type": "api_error", "message": SHUTDOWN_MESSAGE}))
                else:
                    self._abandoned.add(record.key)  # not started: handed back to the queue below, unchanged
                    self._handed_over.add(record.key)
            else:
                sink.add(run.end_event("Cancelled"))
        except FencedOut:
            await events.aclose()
            self._abandoned.add(record.key)
            log.warning("run %s was taken over by another replica; stopped here", record.message_id)
        except Exception as exc:
            await events.aclose()  # storing failed: _finish ends the run as error from the stored log
            if self.store.unavailable(exc):
                log.warning("run %s stopped: the store is out of reach (%s)", record.message_id, _describe(exc))
            else:
                log.exception("run %s stopped: its events could not be stored", record.message_id)
        finally:
            if not started:
                self._pending -= 1
            await self._finish(record, run, sink)

    async def _finish(self, record: RunRecord, run: Run, sink: _StoreSink) -> None:
        abandoned = record.key in self._abandoned
        known_end: Event | None = None
        try:
            await sink.close()
            if sink.last is not None and sink.last.type == "stream_end":
                known_end = sink.last  # durable: the status can follow without reading the log back
        except FencedOut:
            abandoned = True
        except Exception as exc:
            log.warning("run %s: storing its events failed: %s", record.message_id, _describe(exc))
        try:
            if abandoned:
                if record.key in self._handed_over:
                    await self._hand_over(record)
                return
            error = {"type": "api_error", "message": STORE_FAILED_MESSAGE}
            status = await self._end_until_done(record, known_end=known_end, error=error, usage=run.usage)
            if status is None:
                return
            now = time.time()
            metrics.record_run("background", run.served_by.name, run.finish_reason or "Error", run.seq, run.usage, now - record.created_at)
            log.info(
                "run %s %s finish=%s events=%d correlation_id=%s",
                record.message_id, status, run.finish_reason, run.seq, run.request.correlation_id,
            )
            await self._after_end(record)
        finally:
            self.store.release(*record.key)
            asyncio.get_running_loop().call_later(FORGET_AFTER_S, self.store.forget, *record.key)

    async def _end_until_done(self, record: RunRecord, **how: Any) -> str | None:
        """end_run, tried again while the store is out of reach (a Redis restart, a full disk).

        Gives up only when another process owns the run (None) or the server is shutting
        down: then recovery or a peer's takeover ends it from the stored log.
        """
        pause = 0.05
        while True:
            try:
                return await end_run(self.store, record, self.settings.runs.retention_s, **how)
            except FencedOut:
                log.warning("run %s was taken over by another replica before it ended here", record.message_id)
                return None
            except Exception as exc:
                if self.stopping:
                    log.warning("run %s could not be ended before shutdown (%s); it ends on recovery", record.message_id, _describe(exc))
                    return None
                log.warning("run %s: ending it failed (%s); retrying", record.message_id, _describe(exc))
                await asyncio.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)

    async def _hand_over(self, record: RunRecord) -> None:
        try:
            await self.dispatcher.hand_over(record)
            log.info("run %s had not started; left queued for a peer or the next start", record.message_id)
        except Exception as exc:  # its lease expires and a peer's takeover requeues it
            log.warning("run %s: handing it back to the queue failed: %s", record.message_id, _describe(exc))

    async def _after_end(self, record: RunRecord) -> None:
        """Free the run's queue lease and quota slots (best effort: leases expire and are reaped anyway)."""
        try:
            await self.dispatcher.finished(record)
            await self.quotas.release(record.principal, record.tenant, record.message_id)
        except Exception as exc:
            log.warning("run %s ended, but releasing its slots failed: %s", record.message_id, _describe(exc))

    # --- control -------------------------------------------------------------------
    async def cancel(self, tenant: str, message_id: str) -> RunRecord:
        record = await self.store.get_run(tenant, message_id)
        if record is None:
            raise not_found()
        if not record.terminal:
            key = (tenant, message_id)
            task = self._tasks.get(key)
            if task is not None:
                self.cancel_local(tenant, message_id)
                try:
                    await asyncio.shield(asyncio.wait({task}))
                finally:
                    self._cancelling.discard(key)
            else:
                await self.dispatcher.cancel_elsewhere(record)
            record = (await self.store.get_run(tenant, message_id)) or record
        # The answer tells the truth: the run may have ended otherwise meanwhile (completed, or a takeover).
        if record.status != "cancelled":
            raise ApiError(
                409, "conflict_error", f"the run ended with status {record.status!r}; it cannot be cancelled",
                [{"field": "status", "message": record.status, "type": "run_ended"}],
            )
        return record

    def cancel_local(self, tenant: str, message_id: str) -> None:
        """Cancel a run if this process executes it (also on request of another replica)."""
        key = (tenant, message_id)
        task = self._tasks.get(key)
        if task is not None and key not in self._cancelling:
            self._cancelling.add(key)
            task.cancel()

    def abandon_local(self, tenant: str, message_id: str) -> None:
        """Stop a run another replica has taken over, writing nothing more."""
        key = (tenant, message_id)
        task = self._tasks.get(key)
        if task is not None:
            self._abandoned.add(key)
            task.cancel()

    async def delete(self, tenant: str, message_id: str) -> None:
        record = await self.store.get_run(tenant, message_id)
        if record is None:
            raise not_found()
        if not record.terminal:
            with contextlib.suppress(ApiError):
                await self.cancel(tenant, message_id)
        await self.store.delete_run(tenant, message_id)
        await self.dispatcher.deleted(record)

    async def end_orphan(self, record: RunRecord, finish_reason: str, error: dict[str, str] | None, claimed: bool = False) -> str:
        """End a run no task of ours is executing; returns its terminal status.

        If its log already ends with stream_end (its process died before writing the status),
        only the status is finished: a log never gets a second stream_end.
        """
        if not claimed:
            await self.store.claim(*record.key)
        try:
            usage = record.metadata.get("usage") or {}
            status = await end_run(
                self.store, record, self.settings.runs.retention_s, finish_reason=finish_reason, error=error, usage=usage
            )
            await self.quotas.release(record.principal, record.tenant, record.message_id)
            return status
        finally:
            self.store.release(*record.key)

    # --- recovery and retention ---------------------------------------------------------
    async def recover_local(self) -> None:
        """After a restart: runs that never produced an event start again; runs cut off mid-stream end as error."""
        for record in await self.store.unfinished():
            if await self.store.last_event(*record.key) is None:
                await self.store.update_run(*record.key, status="pending", owner=self.owner, updated_at=time.time())
                self.launch_from_record(record.changed(owner=self.owner))
                log.info("run %s requeued after restart", record.message_id)
            else:
                status = await self.end_orphan(record, "Error", {"type": "api_error", "message": CRASH_MESSAGE})
                log.warning("run %s was in flight when the server stopped; ended as %s", record.message_id, status)

    async def _sweep_loop(self) -> None:
        interval = min(60.0, max(0.5, self.settings.runs.retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.store.expire()
                if removed:
                    log.info("expired %d finished runs", removed)
            except Exception:
                log.exception("expiring runs failed")


def _metadata(chat: ChatRequest, config: ModelConfig) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model": config.name,
        "provider": config.provider,
        "priority": chat.priority,
        "correlation_id": chat.correlation_id,
        "event_count": 0,
        "usage": None,
    }
    if chat.metadata:
        meta["metadata"] = chat.metadata
    return meta


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
