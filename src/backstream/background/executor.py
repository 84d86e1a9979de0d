"""Executes background runs in this process: one task per run, its events into the store, one ending.

A background run executes the same `Run.events()` as a synchronous request; its
sink is the store. Events are buffered and flushed by the store's group commit, so
the run loop never waits for a commit. The executor knows nothing of queues: the
dispatcher launches runs here (`RunHost`) and hears back through `RunQueue`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Protocol

from .. import logs, metrics
from ..api_models import ChatRequest
from ..config import ModelConfig, Settings
from ..engine import Run, RunOptions
from ..errors import GatewayError
from ..events import Event, new_ulid
from ..model_table import ModelTable
from ..quotas import Quotas
from ..statuses import FinishReason, RunStatus
from ..store import FencedOut, RunRecord, StreamStore
from ..tools import redact_stored_request
from .lifecycle import end_orphan, end_run

log = logging.getLogger("backstream.executor")

SHUTDOWN_MESSAGE = "the server shut down while this run was in flight"
STORE_FAILED_MESSAGE = "the server could not store this run's events"
RETRY_MAX_S = 2.0  # longest pause between tries to end a run while the store is out of reach


class LimitExceeded(Exception):
    """A run passed runs.max_events or runs.max_bytes: it ends with limit_exceeded."""


class RunQueue(Protocol):
    """What the executor tells the dispatcher when a run it launched is done with."""

    async def hand_over(self, record: RunRecord) -> None: ...

    async def finished(self, record: RunRecord) -> None: ...


class StoreSink:
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


class RunExecutor:
    """Runs background runs as tasks of this process and gives each exactly one ending (see lifecycle)."""

    def __init__(self, settings: Settings, store: StreamStore, models: ModelTable, quotas: Quotas) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.quotas = quotas
        self.options = RunOptions.from_settings(settings)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_ulid()}"
        self.queue: RunQueue | None = None  # the dispatcher, attached by deployment.py
        self.stopping = False
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._records: dict[tuple[str, str], RunRecord] = {}
        self._cancelling: set[tuple[str, str]] = set()
        self._abandoned: set[tuple[str, str]] = set()
        self._handed_over: set[tuple[str, str]] = set()
        self._pending = 0
        self._tool_setups = 0  # runs connecting to their MCP servers: not waiting in the queue (runs.queue_limit)

    @property
    def local_pending(self) -> int:
        return self._pending - self._tool_setups

    @property
    def active(self) -> int:
        return len(self._tasks)

    def local_records(self) -> list[RunRecord]:
        return list(self._records.values())

    def _count_tool_setup(self, busy: bool) -> None:
        self._tool_setups += 1 if busy else -1

    # --- launch ------------------------------------------------------------------------
    def launch(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None:
        self._pending += 1
        metrics.run_started("background", config.name, record.tenant)
        task = asyncio.create_task(self._execute(record, chat, config), name=f"run:{record.message_id}")
        self._tasks[record.key] = task
        self._records[record.key] = record
        key = record.key
        task.add_done_callback(lambda _t: self._forget_task(key))

    def launch_from_record(self, record: RunRecord) -> None:
        """Start a stored run (after a restart or a claim by another process)."""
        try:
            chat = ChatRequest.model_validate_json(record.request)
            config = self.models.resolve(chat.model)
        except (ValueError, GatewayError) as exc:
            error = {"type": "api_error", "message": f"cannot start the run: {exc}"}
            asyncio.get_running_loop().create_task(self.end_orphan(record, FinishReason.ERROR, error, claimed=True))
            return
        self.launch(record, chat, config)

    def _forget_task(self, key: tuple[str, str]) -> None:
        self._tasks.pop(key, None)
        self._records.pop(key, None)
        self._abandoned.discard(key)
        self._handed_over.discard(key)

    # --- one run -----------------------------------------------------------------------
    async def _execute(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None:
        runs = self.settings.runs
        logs.bind(tenant=record.tenant)  # this task's log lines; Run adds message_id and model
        run = Run(record.message_id, chat, self.models, config, self.options, tenant=record.tenant)
        run.on_tool_setup = self._count_tool_setup
        sink = StoreSink(self.store, record, runs.max_events, runs.max_bytes)
        events = run.events()
        started = False
        try:
            try:
                async for event in events:
                    if not started:
                        started = True
                        await self._mark_started(record, run)
                    sink.add(event)
            except LimitExceeded as exc:
                await events.aclose()
                run.seq = sink.count  # the refused event was never stored: the end takes its position
                sink.add(run.end_event(FinishReason.ERROR, {"type": "limit_exceeded", "message": str(exc)}))
        except asyncio.CancelledError:
            await events.aclose()
            self._end_cancelled(record, run, sink, started)
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

    async def _mark_started(self, record: RunRecord, run: Run) -> None:
        """The first event: the run leaves the queue counts and is recorded as processing."""
        self._pending -= 1
        await self.quotas.started(record.principal, record.tenant, record.message_id)
        metadata = {
            **record.metadata,
            "model": run.served_by.name,
            "provider": run.served_by.provider,
            "warnings": run.warnings,
        }
        record.metadata = metadata
        # From its first event on a run is never started again: it needs no MCP token any more.
        record.request = redact_stored_request(record.request)
        await self.store.update_run(
            *record.key, status=RunStatus.PROCESSING, updated_at=time.time(), metadata=metadata, request=record.request
        )

    def _end_cancelled(self, record: RunRecord, run: Run, sink: StoreSink, started: bool) -> None:
        """The run's task was cancelled: by a cancel (stream_end Cancelled), a shutdown, or a takeover (nothing)."""
        if record.key in self._abandoned:
            return
        if self.stopping and record.key not in self._cancelling:
            if started:
                sink.add(run.end_event(FinishReason.ERROR, {"type": "api_error", "message": SHUTDOWN_MESSAGE}))
            else:
                self._abandoned.add(record.key)  # not started: handed back to the queue by _finish, unchanged
                self._handed_over.add(record.key)
            return
        sink.add(run.end_event(FinishReason.CANCELLED))

    async def _finish(self, record: RunRecord, run: Run, sink: StoreSink) -> None:
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
            self._record_end(record, run, status)
            await self._after_end(record)
        finally:
            self.store.release(*record.key)  # its tail stays only while watchers are attached

    def _record_end(self, record: RunRecord, run: Run, status: str) -> None:
        now = time.time()
        metrics.record_run("background", run, now - record.created_at, record.tenant, finish="Error")
        log.info(
            "run %s %s finish=%s events=%d correlation_id=%s",
            record.message_id,
            status,
            run.finish_reason,
            run.seq,
            run.request.correlation_id,
        )

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
                    log.warning(
                        "run %s could not be ended before shutdown (%s); it ends on recovery",
                        record.message_id,
                        _describe(exc),
                    )
                    return None
                log.warning("run %s: ending it failed (%s); retrying", record.message_id, _describe(exc))
                await asyncio.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)

    async def _hand_over(self, record: RunRecord) -> None:
        assert self.queue is not None
        try:
            await self.queue.hand_over(record)
            log.info("run %s had not started; left queued for a peer or the next start", record.message_id)
        except Exception as exc:  # its lease expires and a peer's takeover requeues it
            log.warning("run %s: handing it back to the queue failed: %s", record.message_id, _describe(exc))

    async def _after_end(self, record: RunRecord) -> None:
        """Free the run's queue lease and quota slots (best effort: leases expire and are reaped anyway)."""
        assert self.queue is not None
        try:
            await self.queue.finished(record)
            await self.quotas.release(record.principal, record.tenant, record.message_id)
        except Exception as exc:
            log.warning("run %s ended, but releasing its slots failed: %s", record.message_id, _describe(exc))

    # --- control -------------------------------------------------------------------------
    def cancel_local(self, tenant: str, message_id: str) -> None:
        """Cancel a run if this process executes it (also on request of another replica)."""
        key = (tenant, message_id)
        task = self._tasks.get(key)
        if task is not None and key not in self._cancelling:
            self._cancelling.add(key)
            task.cancel()

    async def cancel_and_wait(self, tenant: str, message_id: str) -> bool:
        """Cancel a run executed here and wait until it has ended; False if this process does not execute it."""
        key = (tenant, message_id)
        task = self._tasks.get(key)
        if task is None:
            return False
        self.cancel_local(tenant, message_id)
        try:
            await asyncio.shield(asyncio.wait({task}))  # the caller may go away; the ending must not
        finally:
            self._cancelling.discard(key)
        return True

    def abandon_local(self, tenant: str, message_id: str) -> None:
        """Stop a run another replica has taken over, writing nothing more."""
        key = (tenant, message_id)
        task = self._tasks.get(key)
        if task is not None:
            self._abandoned.add(key)
            task.cancel()

    async def end_orphan(
        self, record: RunRecord, finish_reason: str, error: dict[str, str] | None, claimed: bool = False
    ) -> str:
        return await end_orphan(
            self.store, self.quotas, self.settings.runs.retention_s, record, finish_reason, error, claimed
        )

    async def stop_runs(self, timeout: float) -> None:
        """Shutdown: every task is cancelled; running runs end with error, unstarted ones are handed back."""
        self.stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
