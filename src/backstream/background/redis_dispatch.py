"""The Redis dispatcher: several replicas share one queue per model.

Queued runs sit in a sorted set ordered by (priority, arrival) and executing runs in
another whose scores are lease deadlines. A Lua script claims the head of the queue
only while fewer than `max_concurrency` live leases exist, so the limit and the
priority order hold across all replicas. Replicas renew their leases; a survivor
reaps expired ones and takes the runs over (fencing the old owner out of the store).
Cancel and delete reach the executing replica over pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from redis.exceptions import RedisError

from ..config import Settings
from ..model_table import UNLIMITED
from ..redis_keys import RedisKeys, member, split_member
from ..statuses import FinishReason
from ..store import RunRecord
from ..store.redis import RedisStore
from .protocols import RunHost

log = logging.getLogger("backstream.dispatch")

_CLAIM = """
local live = redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf')
if live >= tonumber(ARGV[3]) then return false end
local top = redis.call('ZRANGE', KEYS[1], 0, 0)
if #top == 0 then return false end
redis.call('ZREM', KEYS[1], top[1])
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), top[1])
return top[1]
"""
# Expired leases are not dropped but taken: the reaper holds them while it ends or requeues
# each run, so a reaper that fails or dies half-way leaves them to expire and be retried.
_REAP = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for i = 1, #dead do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), dead[i]) end
return dead
"""
# KEYS[1]: the run's queue, then every other model's queue; ARGV: limit (-1: none), score, member.
# Counting and adding in one script makes runs.queue_limit hold under concurrent starts.
_ENQUEUE = """
local limit = tonumber(ARGV[1])
if limit >= 0 then
  local n = 0
  for i = 1, #KEYS do n = n + redis.call('ZCARD', KEYS[i]) end
  if n >= limit then return 0 end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
_PRIORITY_SPAN = 10**13  # ms timestamps stay below this for centuries: score = priority * span + arrival


def _score(record: RunRecord) -> int:
    return record.priority * _PRIORITY_SPAN + int(record.created_at * 1000)


def _member(record: RunRecord) -> str:
    return member(record.tenant, record.message_id)


class RedisDispatcher:
    """Queues runs in Redis; claims, renews and takes over leases so every replica shares the limits."""

    def __init__(self, settings: Settings, store: RedisStore, keys: RedisKeys, host: RunHost) -> None:
        self.settings = settings
        self.store = store
        self.host = host
        self.redis = store.redis
        self.keys = keys
        self.lease_ms = int(settings.redis.lease_s * 1000)
        self.capacity = {m.name: m.max_concurrency or UNLIMITED for m in settings.models}
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        self._claim = self.redis.register_script(_CLAIM)
        self._reap = self.redis.register_script(_REAP)
        self._enqueue = self.redis.register_script(_ENQUEUE)
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self.keys.control_channel)
        self._tasks = [
            asyncio.create_task(self._listen(), name="dispatch:control-listener"),
            asyncio.create_task(self._dispatch_loop(), name="dispatch:claims"),
            asyncio.create_task(self._lease_loop(), name="dispatch:leases"),
        ]
        self._kick.set()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)  # bounded: shutdown must not hang on a loop
        if self._pubsub is not None:
            with contextlib.suppress(RedisError):
                await self._pubsub.aclose()

    async def _publish(self, op: str, record: RunRecord, **extra: Any) -> None:
        await self.redis.publish(
            self.keys.control_channel,
            orjson.dumps({"op": op, "tenant": record.tenant, "id": record.message_id, **extra}),
        )

    # --- queue ------------------------------------------------------------------------
    async def enqueue(self, record: RunRecord, chat: Any = None, config: Any = None, limit: int | None = None) -> bool:
        target = self.keys.queue(record.model)
        keys = [target] + [self.keys.queue(m) for m in self.capacity if self.keys.queue(m) != target]
        args: list[Any] = [-1 if limit is None else limit, _score(record), _member(record)]
        if not await self._enqueue(keys=keys, args=args):
            return False
        await self._publish("work", record)
        return True

    async def hand_over(self, record: RunRecord) -> None:
        """Give a claimed run that has not started back to the queue, at its old place, for any replica."""
        await self._requeue(record)

    async def _requeue(self, record: RunRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.running(record.model), _member(record))
            pipe.zadd(self.keys.queue(record.model), {_member(record): _score(record)})
            await pipe.execute()
        await self._publish("work", record)

    async def pending(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in self.capacity:
                pipe.zcard(self.keys.queue(model))
            return sum(await pipe.execute())

    async def finished(self, record: RunRecord) -> None:
        await self.redis.zrem(self.keys.running(record.model), _member(record))
        await self._publish("work", record)

    async def deleted(self, record: RunRecord) -> None:
        await self.redis.zrem(self.keys.queue(record.model), _member(record))
        await self._publish("deleted", record)

    async def cancel_elsewhere(self, record: RunRecord) -> None:
        """Cancel a run this replica is not executing."""
        if await self.redis.zrem(self.keys.queue(record.model), _member(record)):
            await self.host.end_orphan(record, FinishReason.CANCELLED, None)  # it was still queued: nobody else has it
            return
        await self._publish("cancel", record)
        # Wait long enough for a takeover to end the run if its replica is dead: ending it here
        # as well would race the reaper (the fence keeps it to one ending; the answer reports which).
        deadline = time.monotonic() + self.settings.redis.lease_s * 4 / 3 + 1.0
        while time.monotonic() < deadline:
            current = await self.store.get_run(record.tenant, record.message_id)
            if current is None or current.terminal:
                return
            await self.store.wait(
                record.tenant, record.message_id, await self.store.last_seq(record.tenant, record.message_id), 0.5
            )
        current = await self.store.get_run(record.tenant, record.message_id)
        if current is not None and not current.terminal:
            await self.host.end_orphan(current, FinishReason.CANCELLED, None)

    # --- loops --------------------------------------------------------------------------
    async def _listen(self) -> None:
        while True:
            try:
                async for message in self._pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = orjson.loads(message["data"])
                    op, key = data["op"], (data["tenant"], data["id"])
                    if op == "work":
                        self._kick.set()
                    elif op == "cancel":
                        self.host.cancel_local(*key)
                    elif op == "deleted":
                        self.store.wake(*key)
            except asyncio.CancelledError:
                raise
            except (RedisError, ValueError) as exc:
                log.warning("control channel failed (%s); resubscribing", exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(RedisError):
                    await self._pubsub.subscribe(self.keys.control_channel)

    async def _dispatch_loop(self) -> None:
        # Woken by "work" messages; the timeout is only a safety net for a lost message.
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as the kick
            # arrives (a requeue at shutdown does exactly that), and this loop would outlive stop().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.redis.lease_s / 3):
                    await self._kick.wait()
            self._kick.clear()
            try:
                await self._claim_all()
            except Exception as exc:  # this loop must outlive any one failure
                log.warning("claiming runs failed: %s: %s", type(exc).__name__, exc)

    async def _claim_all(self) -> None:
        for model, capacity in self.capacity.items():
            while not self.host.stopping:
                now = int(time.time() * 1000)
                won = await self._claim(
                    keys=[self.keys.queue(model), self.keys.running(model)], args=[now, self.lease_ms, capacity]
                )
                if not won:
                    break
                await self._start_claimed(model, *split_member(won))

    async def _start_claimed(self, model: str, tenant: str, mid: str) -> None:
        record = await self.store.get_run(tenant, mid)
        if record is None or record.terminal:  # deleted or ended while queued
            await self.redis.zrem(self.keys.running(model), member(tenant, mid))
            return
        await self.store.claim(tenant, mid)
        await self.store.update_run(tenant, mid, owner=self.host.owner)
        self.host.launch_from_record(record.changed(owner=self.host.owner))

    async def _lease_loop(self) -> None:
        interval = self.settings.redis.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._reap_expired()
            except Exception as exc:  # this loop must outlive any one failure
                log.warning("lease upkeep failed: %s: %s", type(exc).__name__, exc)

    async def _renew(self) -> None:
        """Extend the leases of the runs we execute, unless another replica's claim fenced us out."""
        records = [r for r in self.host.local_records() if self.store.fence_of(r.key) is not None]
        if not records:
            return
        stored = await self.store.current_fences([r.key for r in records])
        deadline = int(time.time() * 1000) + self.lease_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for r, fence in zip(records, stored, strict=True):
                if fence == self.store.fence_of(r.key):
                    pipe.zadd(self.keys.running(r.model), {_member(r): deadline}, xx=True)
            await pipe.execute()
        for r, fence in zip(records, stored, strict=True):
            if fence != self.store.fence_of(r.key):
                log.warning("run %s was taken over by another replica; stopping it here", r.message_id)
                self.host.abandon_local(r.tenant, r.message_id)

    async def _reap_expired(self) -> None:
        now = int(time.time() * 1000)
        for model in self.capacity:
            dead = await self._reap(keys=[self.keys.running(model)], args=[now, self.lease_ms])
            for m in dead or ():
                tenant, mid = split_member(m)
                try:  # each takeover on its own: one that fails keeps its lease and is retried later
                    await self._take_over(model, tenant, mid)
                except Exception as exc:
                    log.warning(
                        "taking over run %s failed (%s: %s); retried when its lease expires",
                        mid,
                        type(exc).__name__,
                        exc,
                    )
        self._kick.set()

    async def _take_over(self, model: str, tenant: str, mid: str) -> None:
        """End or requeue a run whose replica stopped renewing its lease (we hold the lease now)."""
        record = await self.store.get_run(tenant, mid)
        if record is None or record.terminal:
            await self.redis.zrem(self.keys.running(model), member(tenant, mid))
            return
        await self.store.claim(tenant, mid)  # fence the presumed-dead owner out
        if await self.store.last_event(tenant, mid) is None:
            self.store.release(tenant, mid)
            await self._requeue(record)
            log.info("run %s requeued: its replica stopped before the first event", mid)
            return
        status = await self.host.end_orphan(
            record,
            FinishReason.ERROR,
            {"type": "api_error", "message": "the replica running this run stopped"},
            claimed=True,
        )
        await self.redis.zrem(self.keys.running(model), member(tenant, mid))
        log.warning("run %s taken over from a stopped replica; ended as %s", mid, status)
