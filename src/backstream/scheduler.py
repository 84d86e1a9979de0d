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
from .engine import Run, RunOptions
from .limits import Quotas
from .errors import ApiError, not_found
from .events import Event, new_ulid
from .models import ModelTable
from .schema import ChatRequest
from .store import FencedOut, RunRecord, StreamStore

log = logging.getLogger("backstream.scheduler")

FORGET_AFTER_S = 30.0  # keep a finished run's frames in memory this long for late watchers
CRASH_MESSAGE = "the server stopped while this run was in flight"
SHUTDOWN_MESSAGE = "the server shut down while this run was in flight"


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

    def add(self, event: Event) -> None:
        if event.type != "stream_end":
            if self.count + 1 >= self.max_events:
                raise LimitExceeded(f"the run exceeded runs.max_events ({self.max_events} events)")
            if self.bytes + len(event.data) > self.max_bytes:
                raise LimitExceeded(f"the run exceeded runs.max_bytes ({self.max_bytes} bytes)")
        self.store.enqueue(self.tenant, self.message_id, event)  # raises if storing failed (e.g. fenced out)
        self.count += 1
        self.bytes += len(event.data)

    async def close(self) -> None:
        await self.store.sync(self.tenant, self.message_id)


def _status_for(run: Run) -> tuple[str, str | None]:
    reason = run.finish_reason
    if reason == "Cancelled":
        return "cancelled", None
    if reason == "Error":
        err = run.error or {}
        return ("error" if err.get("type") == "api_error" else "failed"), err.get("message")
    return "completed", None


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
        self._pending = 0
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
        return self._pending

    @property
    def active(self) -> int:
        return len(self._tasks)

    def local_records(self) -> list[RunRecord]:
        return list(self._records.values())

    async def start(self) -> None:
        await self.dispatcher.start()
        self._sweeper = asyncio.create_task(self._sweep_loop())

    async def stop(self) -> None:
        """Graceful shutdown: queued runs stay queued (they restart with the server), running ones end with error."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await self.dispatcher.stop()

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
        await self.dispatcher.enqueue(record, chat, config)
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

    async def _execute(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None:
        runs = self.settings.runs
        run = Run(record.message_id, chat, self.models, config, self.options)
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
                        await self.store.update_run(*record.key, status="processing", updated_at=time.time(), metadata=metadata)
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
                    self._abandoned.add(record.key)  # still queued: it stays pending and starts again with the server
            else:
                sink.add(run.end_event("Cancelled"))
        except FencedOut:
            await events.aclose()
            self._abandoned.add(record.key)
            log.warning("run %s was taken over by another replica; stopped here", record.message_id)
        except Exception:
            await events.aclose()  # storing failed: _finish records the run as error
            log.exception("run %s stopped: its events could not be stored", record.message_id)
        finally:
            if not started:
                self._pending -= 1
            await self._finish(record, run, sink)

    async def _finish(self, record: RunRecord, run: Run, sink: _StoreSink) -> None:
        abandoned = record.key in self._abandoned
        store_failed = False
        try:
            await sink.close()
        except FencedOut:
            abandoned = True
        except Exception:
            log.exception("run %s: storing events failed", record.message_id)
            store_failed = True
        try:
            if not abandoned:
                status, error_message = _status_for(run)
                if store_failed:
                    status, error_message = "error", "the server could not store this run's events"
                    with contextlib.suppress(Exception):  # best effort: let watchers know why it stopped
                        last = await self.store.last_seq(*record.key)
                        end = Event.build(last + 1, "stream_end", record.message_id, finish_reason="Error", usage=run.usage, citations=None, error={"type": "api_error", "message": error_message})
                        await self.store.append(*record.key, [end])
                now = time.time()
                metadata = {**record.metadata, "event_count": run.seq, "usage": run.usage}
                await self.store.update_run(
                    *record.key,
                    status=status,
                    updated_at=now,
                    completed_at=now,
                    error_message=error_message,
                    expires_at=now + self.settings.runs.retention_s,
                    event_count=await self.store.last_seq(*record.key) if store_failed else run.seq,
                    metadata=metadata,
                )
                metrics.record_run("background", run.served_by.name, run.finish_reason, run.seq, run.usage, now - record.created_at)
                log.info(
                    "run %s %s finish=%s events=%d correlation_id=%s",
                    record.message_id, status, run.finish_reason, run.seq, run.request.correlation_id,
                )
                await self.dispatcher.finished(record)
                await self.quotas.release(record.principal, record.tenant, record.message_id)
        except FencedOut:
            log.warning("run %s was taken over by another replica before it ended here", record.message_id)
        finally:
            self.store.release(*record.key)
            asyncio.get_running_loop().call_later(FORGET_AFTER_S, self.store.forget, *record.key)

    # --- control -------------------------------------------------------------------
    async def cancel(self, tenant: str, message_id: str) -> RunRecord:
        record = await self.store.get_run(tenant, message_id)
        if record is None:
            raise not_found()
        if record.status == "cancelled":
            return record
        if record.terminal:
            raise ApiError(409, "conflict_error", f"the run already ended with status {record.status!r}; it cannot be cancelled")
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
        return (await self.store.get_run(tenant, message_id)) or record

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

    async def end_orphan(self, record: RunRecord, finish_reason: str, error: dict[str, str] | None, claimed: bool = False) -> None:
        """End a run no task of ours is executing: append its stream_end and set a terminal status."""
        if not claimed:
            await self.store.claim(*record.key)
        try:
            last = await self.store.last_seq(*record.key)
            fields: dict[str, Any] = {"finish_reason": finish_reason, "usage": record.metadata.get("usage") or {}, "citations": None}
            if error:
                fields["error"] = error
            await self.store.append(*record.key, [Event.build(last + 1, "stream_end", record.message_id, **fields)])
            now = time.time()
            status = "cancelled" if finish_reason == "Cancelled" else "error"
            await self.store.update_run(
                *record.key,
                status=status,
                updated_at=now,
                completed_at=now,
                error_message=error["message"] if error else None,
                expires_at=now + self.settings.runs.retention_s,
                event_count=last + 1,
            )
            await self.quotas.release(record.principal, record.tenant, record.message_id)
        finally:
            self.store.release(*record.key)

    # --- recovery and retention ---------------------------------------------------------
    async def recover_local(self) -> None:
        """After a restart: runs that never produced an event start again; runs cut off mid-stream end as error."""
        for record in await self.store.unfinished():
            last = await self.store.last_seq(*record.key)
            if last == 0:
                await self.store.update_run(*record.key, status="pending", owner=self.owner, updated_at=time.time())
                self.launch_from_record(record.changed(owner=self.owner))
                log.info("run %s requeued after restart", record.message_id)
            else:
                await self.end_orphan(record, "Error", {"type": "api_error", "message": CRASH_MESSAGE})
                log.warning("run %s was in flight when the server stopped; ended with error", record.message_id)

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
