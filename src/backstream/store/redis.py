"""The Redis store, for several replicas sharing one Redis.

Per run (all keys share the hash tag `{tenant/id}`, so Redis Cluster works):
  `…:meta`   a hash with the run record and its fencing token
  `…:events` a stream; entry id `<seq>-0` is the SSE position, fields t (type) and d (data)
Per tenant, `…:runs:{tenant}` indexes its runs for listing (a sorted set scored by
created_at in ms). It is in another hash slot than the runs, so it is written in the same
round trip just before the run is created (never after: a run missing from it would never
be listed), and kept in step lazily: a member whose meta is gone (deleted, expired by its
PEXPIREAT) is skipped and removed when a listing meets it, and each create trims members
older than `index_horizon_s`.
Writes into a run are fenced: only the replica holding the current token may append
or update it, so a replica presumed dead cannot write after its run was taken over.
Watchers of runs executed elsewhere block on the streams with one multiplexed
XREAD per replica (interrupted with CLIENT UNBLOCK when the set of streams changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..events import Event
from ..redis_keys import Key, RedisKeys
from ..statuses import TERMINAL
from .base import RECORD_FIELDS, FencedOut, RunQuery, RunRecord, StreamStore

log = logging.getLogger("backstream.store.redis")

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# ARGV: fence ('' = unfenced), pexpireat ms ('' = none), field, value, ...
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] ~= '' then
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
  redis.call('PEXPIREAT', KEYS[2], ARGV[2])
end
return 1
"""
# ARGV: fence, maxlen, then (id, type, data) triples
_APPEND = """
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return redis.error_reply('FENCED') end
for i = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], ARGV[i], 't', ARGV[i + 1], 'd', ARGV[i + 2])
end
return 1
"""
INDEX_GRACE_S = 60.0  # an index member without meta younger than this may be a run being created
_LIST_FIELDS = [n for n in RECORD_FIELDS if n != "request"]  # a listing never needs the stored request
_NULLABLE = {"completed_at", "error_message", "expires_at"}
_FLOATS = {"created_at", "updated_at", "completed_at", "expires_at"}
_INTS = {"priority", "event_count"}


def _encode(name: str, value: Any) -> bytes | str:
    if value is None:
        return ""
    if name == "metadata":
        return orjson.dumps(value)
    if isinstance(value, bytes):
        return value
    return str(value)


def _decode(raw: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in RECORD_FIELDS:
        v = raw.get(name.encode())
        if v is None:
            continue
        if name in _NULLABLE and v == b"":
            out[name] = None
        elif name == "metadata":
            out[name] = orjson.loads(v)
        elif name == "request":
            out[name] = v
        elif name in _FLOATS:
            out[name] = float(v)
        elif name in _INTS:
            out[name] = int(v)
        else:
            out[name] = v.decode()
    return out


def _stream_event(eid: bytes, fields: dict[bytes, bytes]) -> Event:
    return Event(int(eid.split(b"-", 1)[0]), fields[b"t"].decode(), None, fields[b"d"])


WRITE_CONNECTIONS = 128
READ_CONNECTIONS = 256


def _pool(url: str, size: int) -> aioredis.BlockingConnectionPool:
    return aioredis.BlockingConnectionPool.from_url(
        url, max_connections=size, timeout=5, retry=_retry(), socket_connect_timeout=2, health_check_interval=30
    )


def _retry() -> Retry:
    # A pooled connection that outlived a Redis restart fails once; reconnect and retry at once
    # rather than answer 503 for every stale connection in the pool.
    return Retry(ExponentialBackoff(cap=0.25, base=0.02), 3)


class RedisStore(StreamStore):
    """Runs as hashes and logs as streams in a Redis shared by replicas; writes fenced per run."""

    name = "redis"
    unavailable_errors = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, OSError)

    def __init__(self, url: str, prefix: str, max_events: int = 100_000, keys: RedisKeys | None = None) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix
        self.keys = keys or RedisKeys(prefix)
        self.max_events = max_events
        # Blocking pools wait for a free connection instead of failing with "Too many connections" when a
        # thousand runs flush at once. Two of them: thousands of watchers reading (replays, statuses) must
        # never leave a run without a connection to store its events or renew its lease (seen at 10,000
        # watchers: runs ended in error with "No connection available").
        self.redis = aioredis.Redis(connection_pool=_pool(url, WRITE_CONNECTIONS))  # writes, leases, scripts
        self.reads = aioredis.Redis(connection_pool=_pool(url, READ_CONNECTIONS))  # what watchers and listings read
        # The follower blocks in XREAD for up to 5 s: its socket must not time out first.
        self._block = aioredis.from_url(
            url, single_connection_client=True, socket_timeout=None, socket_connect_timeout=2, retry=_retry()
        )
        self._fences: dict[Key, int] = {}
        self._lost_keys: set[Key] = set()
        self._followed: dict[Key, int] = {}  # remote runs with waiters -> cursor to follow from
        self._follower: asyncio.Task[None] | None = None
        self._block_id: int | None = None
        self._unblocking: asyncio.Task[None] | None = None
        self._follow_changed = asyncio.Event()
        self._closing = False
        # Index members older than this are trimmed (retention plus slack for long runs); None: never.
        self.index_horizon_s: float | None = None

    # --- keys --------------------------------------------------------------------
    def meta_key(self, key: Key) -> str:
        return self.keys.run_meta(key)

    def events_key(self, key: Key) -> str:
        return self.keys.run_events(key)

    # --- lifecycle ----------------------------------------------------------------
    async def open(self) -> None:
        await self.redis.ping()
        self._create = self.redis.register_script(_CREATE)
        self._update = self.redis.register_script(_UPDATE)
        self._append = self.redis.register_script(_APPEND)
        self._follower = asyncio.create_task(self._follow_loop())

    async def close(self) -> None:
        self._closing = True
        self._follow_changed.set()
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.wait({self._follower}, timeout=5)
        await self._block.aclose()
        await self.reads.aclose()
        await self.redis.aclose()

    async def ping(self) -> str | None:
        try:
            await self.redis.ping()
        except RedisError as exc:
            return f"redis: {exc}"
        return None

    # --- ownership -------------------------------------------------------------------
    async def claim(self, tenant: str, message_id: str) -> int:
        """Take ownership of a run: bump its fencing token; the previous owner's writes now fail."""
        key = (tenant, message_id)
        await super().claim(tenant, message_id)
        fence = int(await self.redis.hincrby(self.meta_key(key), "fence", 1))
        self._fences[key] = fence
        self._lost_keys.discard(key)
        return fence

    def release(self, tenant: str, message_id: str) -> None:
        super().release(tenant, message_id)
        self._fences.pop((tenant, message_id), None)

    def fence_of(self, key: Key) -> int | None:
        """Our fencing token for a run we execute (None: we do not own it)."""
        return self._fences.get(key)

    async def current_fences(self, keys: Sequence[Key]) -> list[int | None]:
        """The fencing tokens stored for these runs now (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(self.meta_key(key), "fence")
            values = await pipe.execute()
        return [None if v is None else int(v) for v in values]

    def _lost(self, key: Key) -> None:
        """Another replica owns the run now: refuse further writes, and wake our watchers so they
        read the real log from Redis instead of our copy, which stops where we were cut off."""
        self._fences.pop(key, None)
        self._drop_tail(key)
        self._lost_keys.add(key)

    # --- records --------------------------------------------------------------------
    async def create_run(self, record: RunRecord) -> bool:
        args: list[Any] = []
        for name in RECORD_FIELDS:
            args += [name, _encode(name, getattr(record, name))]
        args += ["fence", "0"]
        index = self.keys.runs_index(record.tenant)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(index, {record.message_id: record.created_at * 1000}, nx=True)
            if self.index_horizon_s is not None:
                pipe.zremrangebyscore(index, "-inf", f"({(record.created_at - self.index_horizon_s) * 1000}")
            await self._create(keys=[self.meta_key(record.key)], args=args, client=pipe)  # queues it
            results = await pipe.execute()
        created = bool(results[-1])
        if created and not results[0]:  # a member left by an expired run of the same id: this run's time now
            await self.redis.zadd(index, {record.message_id: record.created_at * 1000}, xx=True)
        return created

    async def get_run(self, tenant: str, message_id: str) -> RunRecord | None:
        raw = await self.reads.hgetall(self.meta_key((tenant, message_id)))
        if not raw:
            return None
        return RunRecord(**_decode(cast(dict[bytes, bytes], raw)))

    async def update_run(self, tenant: str, message_id: str, **changes: Any) -> None:
        key = (tenant, message_id)
        if key in self._lost_keys:
            raise FencedOut(f"run {message_id} was taken over by another replica")
        fence = self._fences.get(key)
        expire_ms = ""
        if changes.get("expires_at") is not None and changes.get("status") in TERMINAL:
            expire_ms = str(int(changes["expires_at"] * 1000))
        args: list[Any] = ["" if fence is None else str(fence), expire_ms]
        for name, value in changes.items():
            args += [name, _encode(name, value)]
        result = await self._update(keys=[self.meta_key(key), self.events_key(key)], args=args)
        if result == -1:
            self._lost(key)
            raise FencedOut(f"run {message_id} was taken over by another replica")

    async def unfinished(self) -> list[RunRecord]:
        return []  # with Redis, leases and the work queue find unfinished runs

    async def _delete(self, key: Key) -> bool:
        self._fences.pop(key, None)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.meta_key(key), self.events_key(key))
            pipe.zrem(self.keys.runs_index(key[0]), key[1])
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def list_runs(self, tenant: str, query: RunQuery) -> list[RunRecord]:
        """Walk the tenant's index newest first in batches, reading the metas of each batch in one round trip."""
        index = self.keys.runs_index(tenant)
        top = "+inf" if query.created_before is None else f"({query.created_before * 1000}"
        if query.before is not None:
            top = str(query.before[0] * 1000)  # ties at the cursor's score are sorted out below
        bottom = "-inf" if query.created_after is None else str(query.created_after * 1000)
        batch = max(2 * query.limit, 50)
        found: list[RunRecord] = []
        offset = 0
        while len(found) < query.limit:
            members: Any = await self.reads.zrevrangebyscore(
                index, top, bottom, start=offset, num=batch, withscores=True
            )
            if not members:
                break
            offset += len(members)
            found += await self._listed(tenant, query, [(m.decode(), score) for m, score in members])
        return found[: query.limit]

    async def _listed(self, tenant: str, query: RunQuery, members: list[tuple[str, float]]) -> list[RunRecord]:
        """The runs of `members` that still exist and match; members whose meta is gone leave the index
        (only once older than INDEX_GRACE_S: a run being created is indexed just before its meta exists)."""
        async with self.reads.pipeline(transaction=False) as pipe:
            for mid, _ in members:
                pipe.hmget(self.meta_key((tenant, mid)), _LIST_FIELDS)
            rows = await pipe.execute()
        out, gone = [], []
        settled = (time.time() - INDEX_GRACE_S) * 1000
        for (mid, score), row in zip(members, rows, strict=True):
            if row[0] is None:  # no tenant field: the run was deleted or expired
                if score < settled:
                    gone.append(mid)
                continue
            record = RunRecord(
                **_decode({n.encode(): v for n, v in zip(_LIST_FIELDS, row, strict=True) if v is not None})
            )
            if query.matches(record):
                out.append(record)
        if gone:
            await self.redis.zrem(self.keys.runs_index(tenant), *gone)
        return out

    async def _expire(self, now: float) -> list[Key]:
        return []  # keys carry their own expiry once the run ends

    # --- events ----------------------------------------------------------------------
    async def _persist(self, key: Key, events: Sequence[Event]) -> None:
        fence = self._fences.get(key)
        if fence is None:
            raise FencedOut(f"this replica does not own run {key[1]}")
        args: list[Any] = [str(fence), str(self.max_events)]
        for e in events:
            args += [f"{e.seq}-0", e.type, e.data]
        try:
            await self._append(keys=[self.meta_key(key), self.events_key(key)], args=args)
        except ResponseError as exc:
            if "FENCED" in str(exc):
                self._lost(key)
                raise FencedOut(f"run {key[1]} was taken over by another replica") from None
            raise

    async def _persist_many(self, grouped: dict[Key, list[Event]]) -> dict[Key, Exception]:
        """Every run's events in one pipeline (one round trip); each run's script checks its own fence."""
        failures: dict[Key, Exception] = {}
        keys = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, events in grouped.items():
                fence = self._fences.get(key)
                if fence is None:
                    failures[key] = FencedOut(f"this replica does not own run {key[1]}")
                    continue
                args: list[Any] = [str(fence), str(self.max_events)]
                for e in events:
                    args += [f"{e.seq}-0", e.type, e.data]
                await self._append(keys=[self.meta_key(key), self.events_key(key)], args=args, client=pipe)  # queues it
                keys.append(key)
            results = await pipe.execute(raise_on_error=False)
        for key, result in zip(keys, results, strict=True):
            if isinstance(result, Exception):
                if "FENCED" in str(result):
                    self._lost(key)
                    failures[key] = FencedOut(f"run {key[1]} was taken over by another replica")
                else:
                    failures[key] = result
        return failures

    async def _load_events(self, key: Key, after: int, limit: int) -> list[Event]:
        entries: Any = await self.reads.xrange(self.events_key(key), min=f"{after + 1}-0", max="+", count=limit)
        return [_stream_event(eid, f) for eid, f in entries]

    async def _last_seq(self, key: Key) -> int:
        entries: Any = await self.reads.xrevrange(self.events_key(key), max="+", min="-", count=1)
        return int(entries[0][0].split(b"-", 1)[0]) if entries else 0

    async def _last_event(self, key: Key) -> Event | None:
        entries: Any = await self.reads.xrevrange(self.events_key(key), max="+", min="-", count=1)
        return _stream_event(*entries[0]) if entries else None

    async def last_seq(self, tenant: str, message_id: str) -> int:
        key = (tenant, message_id)
        if key in self._fences:
            return await super().last_seq(tenant, message_id)
        return await self._last_seq(key)

    async def read(self, tenant: str, message_id: str, after: int = 0, limit: int = 512) -> list[Event]:
        key = (tenant, message_id)
        if key in self._fences:
            return await super().read(tenant, message_id, after, limit)
        # Another replica's run: the follower feeds what it reads into the tail, so its watchers share
        # one XREAD instead of an XRANGE each per event. An empty answer may be behind Redis; the wait()
        # that follows it asks Redis from the same cursor, so nothing is missed.
        tail = self._tails.get(key)
        held = tail.after(after, limit) if tail is not None else None
        if held is not None:
            return held
        return await self._load_events(key, after, limit)

    async def wait(self, tenant: str, message_id: str, after: int, timeout: float) -> bool:
        key = (tenant, message_id)
        if key in self._fences or self.closing:  # executed here: the local tail is current
            return await super().wait(tenant, message_id, after, timeout)
        tail = self._tail_for(key, after)
        tail.done = True  # another replica writes it: its tail goes with its last watcher here
        if tail.last_seq > after:
            return True
        self._follow(key, after)
        return await tail.wait(timeout)

    # --- following remote runs ------------------------------------------------------------
    def _follow(self, key: Key, after: int) -> None:
        current = self._followed.get(key)
        if current is not None and current <= after:
            return
        self._followed[key] = after
        self._follow_changed.set()
        # One unblocking task at a time: a thousand watchers attaching at once would otherwise send a
        # thousand CLIENT UNBLOCKs and take every pooled connection from the runs' writes.
        if self._block_id is not None and (self._unblocking is None or self._unblocking.done()):
            self._unblocking = asyncio.get_running_loop().create_task(self._unblock())
            self._unblocking.add_done_callback(self._unblock_again)

    def _unblock_again(self, task: asyncio.Task[None]) -> None:
        """A change made while the last unblock was finishing must not wait for the XREAD's timeout."""
        if self._follow_changed.is_set() and self._block_id is not None and not self._closing:
            self._unblocking = asyncio.get_running_loop().create_task(self._unblock())
            self._unblocking.add_done_callback(self._unblock_again)

    def _feed(self, key: Key, entries: list[Any]) -> None:
        """What the follower read of a remote run joins its tail (kept contiguous) and wakes its watchers."""
        tail = self._tail_of(key)
        if tail is None or key in self._fences:
            return
        events = [e for e in (_stream_event(eid, fields) for eid, fields in entries) if e.seq > tail.last_seq]
        if not events:
            return
        if tail.events and tail.events[-1].seq + 1 != events[0].seq:
            self.cached_bytes -= tail.clear()  # a gap: readers of older cursors go to Redis
        self._publish(key, events)

    async def _unblock(self) -> None:
        """Interrupt the follower's XREAD so it picks up the new stream set.

        If the unblock lands before the XREAD starts blocking it is lost, so retry
        until the follower has taken the change (it clears `_follow_changed`).
        """
        for _ in range(100):
            if not self._follow_changed.is_set() or self._block_id is None:
                return
            with contextlib.suppress(RedisError):
                if await self.redis.client_unblock(self._block_id):
                    return
            await asyncio.sleep(0.002)

    async def _follow_loop(self) -> None:
        # redis-py can swallow a cancellation that lands while it connects, so the loop
        # also checks `_closing` after every await.
        while not self._closing:
            try:
                self._block_id = int(await self._block.client_id())
                while not self._closing:
                    if not self._followed:
                        self._follow_changed.clear()
                        await self._follow_changed.wait()
                        continue
                    self._follow_changed.clear()
                    for k in [k for k in self._followed if not ((t := self._tail_of(k)) and t.watched)]:
                        del self._followed[k]  # nobody waits any more
                    if not self._followed:
                        continue
                    streams: dict[Any, Any] = {self.events_key(k): f"{after}-0" for k, after in self._followed.items()}
                    result: Any = await self._block.xread(streams, block=5000, count=1000)
                    for stream_key, entries in result or ():
                        if not entries:
                            continue
                        key = self.keys.run_of_events(stream_key)
                        self._feed(key, entries)
                        self._followed.pop(key, None)  # re-followed by the next wait()
            except RedisError as exc:
                if self._closing:
                    return
                log.warning("following streams failed (%s); retrying", exc)
                self._block_id = None
                await asyncio.sleep(0.5)
