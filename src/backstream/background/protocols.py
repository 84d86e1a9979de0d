"""The two seams between the executor and a dispatcher, as protocols: neither imports the other."""

from __future__ import annotations

from typing import Any, Protocol

from ..api_models import ChatRequest
from ..config import ModelConfig
from ..store import RunRecord


class RunHost(Protocol):
    """What a dispatcher may ask of the process that executes runs (a `RunExecutor`)."""

    owner: str  # this process's name in run records and leases
    stopping: bool  # draining: claim nothing more

    @property
    def local_pending(self) -> int: ...

    def launch(self, record: RunRecord, chat: ChatRequest, config: ModelConfig) -> None: ...

    def launch_from_record(self, record: RunRecord) -> None: ...

    def cancel_local(self, tenant: str, message_id: str) -> None: ...

    def abandon_local(self, tenant: str, message_id: str) -> None: ...

    def local_records(self) -> list[RunRecord]: ...

    async def end_orphan(
        self, record: RunRecord, finish_reason: str, error: dict[str, str] | None, claimed: bool = False
    ) -> str: ...


class Dispatcher(Protocol):
    """Decides when and where a background run executes: in this process at once, or queued across replicas."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def enqueue(self, record: RunRecord, chat: Any, config: Any, limit: int | None = None) -> bool:
        """Queue a new run unless `limit` runs wait already (checked atomically); False if the queue is full."""
        ...

    async def pending(self) -> int: ...

    async def hand_over(self, record: RunRecord) -> None:
        """A claimed run that had not started goes back to the queue (graceful shutdown)."""
        ...

    async def finished(self, record: RunRecord) -> None: ...

    async def cancel_elsewhere(self, record: RunRecord) -> None:
        """Cancel a run this process does not execute."""
        ...

    async def deleted(self, record: RunRecord) -> None: ...
