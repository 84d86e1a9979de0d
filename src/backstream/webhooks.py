"""Webhooks: when a background run ends, a signed JSON event to every matching configured endpoint.

The outbox: `end_run` (background/lifecycle.py) calls `Webhooks.run_ended` just before it writes
the terminal status (so a crash in between is ended again by recovery and re-enqueues), which stores one
delivery per matching endpoint (`webhooks: [{url, secret_env, events?, tenants?}]`). Its id
(`msg_…`) is a hash of (endpoint, tenant, run), so storing it twice (two replicas, a recovery)
keeps one delivery. A worker task claims due deliveries (on Redis atomically, with a lease, so
one replica sends each), POSTs them through the egress rules (`PinnedTransport`), and on
anything but 2xx tries again with exponential backoff and jitter until `webhooks_retry_s` has
passed since the run ended; then it gives up and logs. Outcomes count in
`backstream_webhook_deliveries_total`.

Signatures follow the Standard Webhooks specification: `webhook-id`, `webhook-timestamp`
(seconds, at each attempt), `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
with the base64-decoded secret after `whsec_`. The secret is read from `secret_env` at each
attempt; it is never stored with a delivery nor logged.

Where deliveries live (their own backend, not the run store): memory (a dict, lost on exit),
SQLite (`webhooks.db` next to `backstream.db` in the data dir), Redis (a sorted set of due ids
and a hash per delivery under `<prefix>:webhooks:{w}:`, one hash tag). A delivered or abandoned
delivery is kept as `done` for `DONE_KEEP_S`, so a late second enqueue stays a no-op.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx2

from . import metrics
from .config import Settings, WebhookConfig
from .egress import EgressDenied, PinnedTransport, check_url_shape
from .store import RunRecord

log = logging.getLogger("backstream.webhooks")

DONE_KEEP_S = 7 * 86400.0  # a finished delivery's id is remembered this long (idempotent enqueue)
LEASE_S = 5.0  # beyond webhooks_timeout_s: a claimed delivery is sent again after this if its sender vanished
BATCH = 16
EVENT_TYPES = {"completed": "run.completed", "failed": "run.failed", "cancelled": "run.cancelled", "error": "run.error"}


@dataclass
class Delivery:
    id: str
    url: str
    body: bytes
    created_at: float
    attempts: int = 0


def delivery_id(url: str, tenant: str, message_id: str) -> str:
    digest = hashlib.sha256(f"{url}\0{tenant}\0{message_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks `webhook-signature` value for one attempt."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_body(record: RunRecord) -> bytes:
    """The event: `type`, `timestamp`, `data` (the run's status object, as GET …/status, plus its tenant)."""
    data = {
        "message_id": record.message_id,
        "tenant": record.tenant,
        "status": record.status,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "completed_at": _iso(record.completed_at),
        "error_message": record.error_message,
        "stream_type": "chat_completion",
        "metadata": {**record.metadata, "event_count": record.event_count},
    }
    event = {"type": EVENT_TYPES[str(record.status)], "timestamp": _iso(record.completed_at), "data": data}
    return json.dumps(event, separators=(",", ":"), default=str).encode()


def matches(endpoint: WebhookConfig, event_type: str, tenant: str) -> bool:
    if endpoint.events is not None and event_type not in endpoint.events:
        return False
    return endpoint.tenants is None or tenant in endpoint.tenants


# --- backends ---------------------------------------------------------------------------
class OutboxBackend(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, delivery: Delivery, now: float) -> bool: ...

    async def claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]: ...

    async def retry(self, delivery: Delivery, due_at: float) -> None: ...

    async def done(self, delivery: Delivery, now: float) -> None: ...


class MemoryOutbox:
    """In this process only: deliveries do not survive a restart (like the memory store's runs)."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[float, Delivery]] = {}
        self.finished: set[str] = set()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, delivery: Delivery, now: float) -> bool:
        if delivery.id in self.pending or delivery.id in self.finished:
            return False
        self.pending[delivery.id] = (now, delivery)
        return True

    async def claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        due = [d for at, d in self.pending.values() if at <= now][:limit]
        for d in due:
            self.pending[d.id] = (now + lease_s, d)
        return due

    async def retry(self, delivery: Delivery, due_at: float) -> None:
        self.pending[delivery.id] = (due_at, delivery)

    async def done(self, delivery: Delivery, now: float) -> None:
        self.pending.pop(delivery.id, None)
        self.finished.add(delivery.id)


_SCHEMA = """CREATE TABLE IF NOT EXISTS deliveries (
  id TEXT PRIMARY KEY, url TEXT NOT NULL, body BLOB NOT NULL, created_at REAL NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0, due_at REAL, done_at REAL, claimed INTEGER NOT NULL DEFAULT 0)"""


class SQLiteOutbox:
    """A table in its own file (`webhooks.db` in the data dir), one connection used from one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.lock = asyncio.Lock()

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        async with self.lock:
            return await asyncio.to_thread(self._execute, sql, args)

    def _execute(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        assert self.conn is not None
        with self.conn:
            return self.conn.execute(sql, args).fetchall()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(_SCHEMA)
        # One process owns the file: what it had claimed when it stopped is due again at once.
        self.conn.execute("UPDATE deliveries SET due_at = ?, claimed = 0 WHERE claimed = 1", (time.time(),))

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    async def add(self, delivery: Delivery, now: float) -> bool:
        sql = "INSERT OR IGNORE INTO deliveries (id, url, body, created_at, due_at) VALUES (?, ?, ?, ?, ?) RETURNING id"
        rows = await self._run(sql, (delivery.id, delivery.url, delivery.body, delivery.created_at, now))
        await self._run("DELETE FROM deliveries WHERE done_at IS NOT NULL AND done_at < ?", (now - DONE_KEEP_S,))
        return bool(rows)

    async def claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        sql = (
            "UPDATE deliveries SET due_at = ?, claimed = 1 WHERE id IN (SELECT id FROM deliveries WHERE done_at IS NULL"
            " AND due_at <= ? ORDER BY due_at LIMIT ?) RETURNING id, url, body, created_at, attempts"
        )
        rows = await self._run(sql, (now + lease_s, now, limit))
        return [Delivery(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    async def retry(self, delivery: Delivery, due_at: float) -> None:
        await self._run(
            "UPDATE deliveries SET due_at = ?, attempts = ?, claimed = 0 WHERE id = ?",
            (due_at, delivery.attempts, delivery.id),
        )

    async def done(self, delivery: Delivery, now: float) -> None:
        sql = "UPDATE deliveries SET done_at = ?, due_at = NULL, attempts = ?, claimed = 0 WHERE id = ?"
        await self._run(sql, (now, delivery.attempts, delivery.id))


_ADD = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], 'url', ARGV[1], 'body', ARGV[2], 'created_at', ARGV[3], 'attempts', 0)
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
return 1
"""
# Claim atomically: due ids move to now + lease, so one replica sends each.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  local h = redis.call('HMGET', ARGV[4] .. id, 'url', 'body', 'created_at', 'attempts')
  if h[1] then table.insert(out, {id, h[1], h[2], h[3], h[4]}) else redis.call('ZREM', KEYS[1], id) end
end
return out
"""


class RedisOutbox:
    """Shared by replicas: `<prefix>:webhooks:{w}:due` (sorted set: id → due time), `…:d:<id>` (hash)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.base = f"{prefix}:webhooks:{{w}}:"
        self.due = self.base + "due"

    async def open(self) -> None:
        self._add = self.redis.register_script(_ADD)
        self._claim = self.redis.register_script(_CLAIM)

    async def close(self) -> None: ...

    async def add(self, delivery: Delivery, now: float) -> bool:
        args = [delivery.url, delivery.body, repr(delivery.created_at), repr(now), delivery.id]
        return bool(await self._add(keys=[self.due, self.base + "d:" + delivery.id], args=args))

    async def claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        args = [repr(now), repr(now + lease_s), limit, self.base + "d:"]
        rows = await self._claim(keys=[self.due], args=args)
        return [Delivery(r[0].decode(), r[1].decode(), bytes(r[2]), float(r[3]), int(r[4])) for r in rows]

    async def retry(self, delivery: Delivery, due_at: float) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.base + "d:" + delivery.id, "attempts", delivery.attempts)
        pipe.zadd(self.due, {delivery.id: due_at}, xx=True)
        await pipe.execute()

    async def done(self, delivery: Delivery, now: float) -> None:
        key = self.base + "d:" + delivery.id
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.due, delivery.id)
        pipe.hset(key, mapping={"done_at": repr(now), "body": b"", "attempts": delivery.attempts})
        pipe.expire(key, int(DONE_KEEP_S))
        await pipe.execute()


# --- the outbox and its worker ----------------------------------------------------------
class Webhooks:
    """The configured endpoints, the outbox backend, and the worker that sends due deliveries."""

    def __init__(self, settings: Settings, backend: OutboxBackend) -> None:
        self.endpoints = settings.webhooks
        self.settings = settings
        self.backend = backend
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx2.AsyncClient | None = None

    async def run_ended(self, record: RunRecord) -> None:
        """Store one delivery per matching endpoint for a run that just got its terminal status."""
        event_type = EVENT_TYPES.get(str(record.status))
        if event_type is None:
            return
        body = event_body(record)
        now = time.time()
        for endpoint in self.endpoints:
            if matches(endpoint, event_type, record.tenant):
                delivery = Delivery(delivery_id(endpoint.url, *record.key), endpoint.url, body, now)
                if await self.backend.add(delivery, now):
                    log.info("webhook %s queued for run %s (%s)", delivery.id, record.message_id, event_type)
        self._wake.set()

    async def start(self) -> None:
        await self.backend.open()
        self._client = httpx2.AsyncClient(
            transport=PinnedTransport(self.settings.egress), timeout=self.settings.webhooks_timeout_s
        )
        self._task = asyncio.create_task(self._work(), name="webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        await self.backend.close()

    async def _work(self) -> None:
        poll = min(1.0, self.settings.webhooks_backoff_s)
        while True:
            try:
                due = await self.backend.claim(time.time(), LEASE_S + self.settings.webhooks_timeout_s, BATCH)
                await asyncio.gather(*(self._deliver(d) for d in due))
            except Exception as exc:
                log.warning("webhook deliveries: %s: %s; trying again", type(exc).__name__, exc)
                due = []
            if len(due) < BATCH:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), poll)
                except TimeoutError:
                    pass

    async def _deliver(self, delivery: Delivery) -> None:
        delivery.attempts += 1
        endpoint = next((e for e in self.endpoints if e.url == delivery.url), None)
        if endpoint is None:
            log.warning("webhook %s dropped: its endpoint is no longer configured", delivery.id)
            await self._finish(delivery, "dropped")
            return
        try:
            failure = await self._post(endpoint, delivery)
        except EgressDenied as exc:
            log.warning("webhook %s to %s refused by the egress rules: %s", delivery.id, endpoint.url, exc)
            await self._finish(delivery, "denied")
            return
        if failure is None:
            log.info("webhook %s delivered (attempt %d)", delivery.id, delivery.attempts)
            await self._finish(delivery, "delivered")
            return
        await self._again(delivery, failure)

    async def _post(self, endpoint: WebhookConfig, delivery: Delivery) -> str | None:
        """One attempt; None on 2xx, else what went wrong."""
        check_url_shape(endpoint.url, self.settings.egress)
        secret = os.environ.get(endpoint.secret_env, "")
        if not secret:
            return f"the secret variable {endpoint.secret_env} is not set"
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, delivery.id, stamp, delivery.body),
        }
        assert self._client is not None
        try:
            resp = await self._client.post(endpoint.url, content=delivery.body, headers=headers)
        except httpx2.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= resp.status_code < 300 else f"status {resp.status_code}"

    async def _again(self, delivery: Delivery, failure: str) -> None:
        now = time.time()
        if now - delivery.created_at >= self.settings.webhooks_retry_s:
            log.error("webhook %s gave up after %d attempts: %s", delivery.id, delivery.attempts, failure)
            await self._finish(delivery, "gave_up")
            return
        base = self.settings.webhooks_backoff_s * 2 ** min(delivery.attempts - 1, 30)
        pause = min(self.settings.webhooks_backoff_max_s, base) * random.uniform(0.75, 1.25)
        metrics.WEBHOOK_DELIVERIES.labels(outcome="failed").inc()
        log.warning("webhook %s attempt %d failed (%s); next in %.1fs", delivery.id, delivery.attempts, failure, pause)
        await self.backend.retry(delivery, now + pause)

    async def _finish(self, delivery: Delivery, outcome: str) -> None:
        metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
        await self.backend.done(delivery, time.time())


def build_webhooks(settings: Settings, redis: Any = None) -> Webhooks | None:
    """None without configured endpoints. Deliveries live beside the run store (see the module text)."""
    if not settings.webhooks:
        return None
    backend: OutboxBackend
    if settings.store == "redis":
        backend = RedisOutbox(redis, settings.redis.key_prefix)
    elif settings.store == "sqlite":
        backend = SQLiteOutbox(settings.data_path / "webhooks.db")
    else:
        backend = MemoryOutbox()
    return Webhooks(settings, backend)
