"""Start, cancel and delete background runs: what the HTTP surface asks of the background machinery."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from ..api_models import ChatRequest
from ..config import ModelConfig, Settings
from ..errors import Conflict, GatewayError, NotFound, QueueFull
from ..quotas import Quotas
from ..statuses import RunStatus
from ..store import RunRecord, StreamStore
from .executor import RunExecutor
from .protocols import Dispatcher


class BackgroundRuns:
    """Submit, cancel and delete runs, whichever process executes them."""

    def __init__(
        self, settings: Settings, store: StreamStore, quotas: Quotas, executor: RunExecutor, dispatcher: Dispatcher
    ) -> None:
        self.settings = settings
        self.store = store
        self.quotas = quotas
        self.executor = executor
        self.dispatcher = dispatcher

    async def submit(
        self, tenant: str, principal: str, message_id: str, chat: ChatRequest, config: ModelConfig, raw_request: bytes
    ) -> RunRecord:
        limit = self.settings.runs.queue_limit
        pending = await self.dispatcher.pending()
        if pending >= limit:
            raise QueueFull(f"the run queue is full ({pending} runs waiting); retry later")
        if await self.store.get_run(tenant, message_id) is not None:
            raise _taken(message_id)
        await self.quotas.acquire(principal, tenant, message_id, queued=True)
        record = _new_record(tenant, principal, message_id, chat, config, raw_request, self.executor.owner)
        if not await self.store.create_run(record):
            await self.quotas.release(principal, tenant, message_id)
            raise _taken(message_id)
        # The queue limit is checked again where the run joins the queue, in one atomic step:
        # the check above is only a fast refusal, many starts can pass it at once.
        if not await self.dispatcher.enqueue(record, chat, config, limit=limit):
            await self.store.delete_run(tenant, message_id)
            await self.quotas.release(principal, tenant, message_id)
            raise QueueFull("the run queue is full; retry later")
        return record

    async def cancel(self, tenant: str, message_id: str) -> RunRecord:
        record = await self.store.get_run(tenant, message_id)
        if record is None:
            raise NotFound()
        if not record.terminal:
            if not await self.executor.cancel_and_wait(tenant, message_id):
                await self.dispatcher.cancel_elsewhere(record)
            record = (await self.store.get_run(tenant, message_id)) or record
        # The answer tells the truth: the run may have ended otherwise meanwhile (completed, or a takeover).
        if record.status != RunStatus.CANCELLED:
            status = str(record.status)
            raise Conflict(
                f"the run ended with status {status!r}; it cannot be cancelled",
                [{"field": "status", "message": status, "type": "run_ended"}],
            )
        return record

    async def delete(self, tenant: str, message_id: str) -> None:
        record = await self.store.get_run(tenant, message_id)
        if record is None:
            raise NotFound()
        if not record.terminal:
            with contextlib.suppress(GatewayError):
                await self.cancel(tenant, message_id)
        await self.store.delete_run(tenant, message_id)
        await self.dispatcher.deleted(record)


def _taken(message_id: str) -> Conflict:
    return Conflict(f"a run with message_id {message_id!r} already exists")


def _new_record(
    tenant: str, principal: str, message_id: str, chat: ChatRequest, config: ModelConfig, raw: bytes, owner: str
) -> RunRecord:
    now = time.time()
    return RunRecord(
        tenant=tenant,
        message_id=message_id,
        created_at=now,
        updated_at=now,
        metadata=_metadata(chat, config),
        request=raw,
        priority=chat.priority,
        model=config.name,
        owner=owner,
        principal=principal,
    )


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
