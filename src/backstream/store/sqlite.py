"""The embedded store: one SQLite file in WAL mode.

All writes go through one thread that drains whatever is queued into a single
transaction (group commit): a thousand runs appending tokens cost a few commits
per second, not one per token. Reads use their own connection and thread, so a
watcher replaying a long run never waits behind the writer.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from ..events import Event
from .base import RECORD_FIELDS, TERMINAL, Key, RunQuery, RunRecord, StreamStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    tenant TEXT NOT NULL,
    message_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    completed_at REAL,
    error_message TEXT,
    metadata BLOB NOT NULL,
    request BLOB NOT NULL,
    priority INTEGER NOT NULL,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    principal TEXT NOT NULL,
    expires_at REAL,
    event_count INTEGER NOT NULL,
    PRIMARY KEY (tenant, message_id)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_expiry ON runs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_listing ON runs (tenant, created_at, message_id);
CREATE TABLE IF NOT EXISTS events (
    tenant TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (tenant, message_id, seq)
) WITHOUT ROWID;
"""

_COLUMNS = ", ".join(RECORD_FIELDS)
# Listing never needs the stored request: it is left out (an empty blob in its place).
_LIST_COLUMNS = ", ".join("X'' AS request" if n == "request" else n for n in RECORD_FIELDS)
_PLACEHOLDERS = ", ".join("?" for _ in RECORD_FIELDS)
_STOP = object()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a killed process loses nothing committed; only a power cut may lose the last commits.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    # Overwrite deleted content (a redacted token, an expired run) instead of leaving it in free pages.
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def _row(record: RunRecord) -> tuple[Any, ...]:
    values = []
    for name in RECORD_FIELDS:
        v = getattr(record, name)
        values.append(orjson.dumps(v) if name == "metadata" else v)
    return tuple(values)


def _record(row: Sequence[Any]) -> RunRecord:
    data = dict(zip(RECORD_FIELDS, row, strict=True))
    data["metadata"] = orjson.loads(data["metadata"])
    data["request"] = bytes(data["request"])
    return RunRecord(**data)


# Rows per INSERT statement, largest first. executemany steps once per row, and the sqlite3 module
# lets go of the GIL around every step: at 20,000 events a second the writer thread and the event
# loop handed the GIL back and forth per event (each hand-back can wait for the 5 ms switch interval).
# Multi-row statements step once per chunk; powers of two keep the distinct statements (cached) few.
_CHUNKS = (512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
_INSERTS = {n: "INSERT OR IGNORE INTO events VALUES " + ", ".join(["(?, ?, ?, ?, ?)"] * n) for n in _CHUNKS}


def _insert_events(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    i = 0
    for size in _CHUNKS:
        while len(rows) - i >= size:
            conn.execute(_INSERTS[size], [value for row in rows[i : i + size] for value in row]).close()
            i += size


def _append_events(conn: sqlite3.Connection, batch: list[Any], i: int, results: list[Any]) -> int:
    """Consecutive event appends (of any runs) from batch[i] on, in a few multi-row INSERTs; returns the next index."""
    rows, futs = [], []
    while i < len(batch) and isinstance(batch[i][0], list):
        rows.extend(batch[i][0])
        futs.append(batch[i][1])
        i += 1
    try:
        _insert_events(conn, rows)
        results.extend((f, None, None) for f in futs)
    except sqlite3.Error as exc:
        results.extend((f, None, exc) for f in futs)
    return i


# A run's events in one row: fetching row by row lets go of the GIL per row, and beside a busy event
# loop each hand-back waits (512 events: 370 ms by rows, 11 ms as one row, at the default switch
# interval). Separators 0x1F and 0x1E never occur raw in an event type or in JSON (orjson escapes them).
_LOAD_EVENTS = (
    "SELECT group_concat(seq || char(31) || type || char(31) || CAST(data AS TEXT), char(30)) FROM "
    "(SELECT seq, type, data FROM events WHERE tenant = ? AND message_id = ? AND seq > ? ORDER BY seq LIMIT ?)"
)


def _split_events(joined: str | None) -> list[Event]:
    if not joined:
        return []
    events = []
    for part in joined.split("\x1e"):
        seq, type_, data = part.split("\x1f", 2)
        events.append(Event(int(seq), type_, None, data.encode()))
    events.sort(key=_by_seq)  # group_concat keeps the subquery's order in practice; SQLite does not promise it
    return events


def _by_seq(event: Event) -> int:
    return event.seq


def _listing_sql(tenant: str, query: RunQuery) -> tuple[str, tuple[Any, ...]]:
    """One keyset page; the walk goes down the (tenant, created_at, message_id) index."""
    where: list[str] = ["tenant = ?"]
    args: list[Any] = [tenant]
    if query.before is not None:
        where.append("(created_at, message_id) < (?, ?)")
        args += list(query.before)
    for clause, value in (
        ("status = ?", query.status),
        ("model = ?", query.model),
        ("created_at >= ?", query.created_after),
        ("created_at < ?", query.created_before),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    sql = (
        f"SELECT {_LIST_COLUMNS} FROM runs INDEXED BY runs_listing WHERE {' AND '.join(where)}"
        " ORDER BY created_at DESC, message_id DESC LIMIT ?"
    )
    return sql, (*args, query.limit)


class SQLiteStore(StreamStore):
    """Runs and logs in one SQLite file; one writer thread commits whatever is queued in one transaction."""

    name = "sqlite"
    # A full or failing disk, or a file another process holds locked: retry later, not a bad request.
    unavailable_errors = (sqlite3.OperationalError, OSError)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-read")
        self._read_conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)
        conn.executescript(_SCHEMA)
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="sqlite-write", daemon=True)
        self._writer.start()
        self._read_conn = _connect(self.path)

    async def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join, 10)
            self._writer = None
        self._reader.shutdown(wait=True)
        if self._read_conn is not None:
            self._read_conn.close()

    async def ping(self) -> str | None:
        try:
            await self._read(lambda c: c.execute("SELECT 1").fetchone())
        except sqlite3.Error as exc:
            return f"sqlite: {exc}"
        return None

    # --- plumbing ------------------------------------------------------------
    def _write_loop(self, conn: sqlite3.Connection) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i is _STOP for i in batch)
            batch = [i for i in batch if i is not _STOP]
            results: list[tuple[Future[Any], Any, BaseException | None]] = []
            try:
                conn.execute("BEGIN")
                i = 0
                while i < len(batch):
                    fn, fut = batch[i]
                    if isinstance(fn, list):
                        i = _append_events(conn, batch, i, results)
                        continue
                    i += 1
                    try:
                        value = fn(conn)
                        if isinstance(value, sqlite3.Cursor):
                            # A cursor freed later on the event loop thread would touch this
                            # connection concurrently with the writer: close it here.
                            value.close()
                            value = None
                        results.append((fut, value, None))
                    except sqlite3.Error as exc:
                        results.append((fut, None, exc))
                conn.execute("COMMIT")
            except sqlite3.Error as failed:
                results = [(fut, None, failed) for _, fut in batch]
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for fut, value, error in results:
                # A waiter cancelled meanwhile (its run cancelled or deleted) cannot take a result;
                # setting one would raise and end this thread, and with it every later write.
                if not fut.set_running_or_notify_cancel():
                    continue
                if error is None:
                    fut.set_result(value)
                else:
                    fut.set_exception(error)
            if stop:
                conn.close()
                return

    async def _write(self, fn: Callable[[sqlite3.Connection], Any] | list[tuple[Any, ...]]) -> Any:
        """Queue a write (a function of the connection, or event rows) for the writer's next transaction."""
        fut: Future[Any] = Future()
        self._queue.put((fn, fut))
        return await asyncio.wrap_future(fut)

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._read_conn
        assert conn is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    # --- records ----------------------------------------------------------------
    async def create_run(self, record: RunRecord) -> bool:
        row = _row(record)
        return await self._write(
            lambda c: c.execute(f"INSERT OR IGNORE INTO runs ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", row).rowcount == 1
        )

    async def get_run(self, tenant: str, message_id: str) -> RunRecord | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE tenant = ? AND message_id = ?", (tenant, message_id)
            ).fetchone()
        )
        return None if row is None else _record(row)

    async def update_run(self, tenant: str, message_id: str, **changes: Any) -> None:
        if not changes:
            return
        names = list(changes)
        values = [orjson.dumps(changes[n]) if n == "metadata" else changes[n] for n in names]
        sets = ", ".join(f"{n} = ?" for n in names)
        await self._write(
            lambda c: c.execute(
                f"UPDATE runs SET {sets} WHERE tenant = ? AND message_id = ?", (*values, tenant, message_id)
            )
        )

    async def unfinished(self) -> list[RunRecord]:
        marks = ", ".join("?" for _ in TERMINAL)
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_COLUMNS} FROM runs WHERE status NOT IN ({marks}) ORDER BY created_at", tuple(TERMINAL)
            ).fetchall()
        )
        return [_record(r) for r in rows]

    async def list_runs(self, tenant: str, query: RunQuery) -> list[RunRecord]:
        sql, args = _listing_sql(tenant, query)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [_record(r) for r in rows]

    async def _delete(self, key: Key) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM events WHERE tenant = ? AND message_id = ?", key)
            return c.execute("DELETE FROM runs WHERE tenant = ? AND message_id = ?", key).rowcount == 1

        return await self._write(delete)

    async def _expire(self, now: float) -> list[Key]:
        def expire(c: sqlite3.Connection) -> list[Key]:
            keys = c.execute(
                "SELECT tenant, message_id FROM runs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()
            c.executemany("DELETE FROM events WHERE tenant = ? AND message_id = ?", keys)
            c.executemany("DELETE FROM runs WHERE tenant = ? AND message_id = ?", keys)
            return [tuple(k) for k in keys]

        return await self._write(expire)

    # --- events -------------------------------------------------------------------
    async def _persist(self, key: Key, events: Sequence[Event]) -> None:
        tenant, message_id = key
        await self._write([(tenant, message_id, e.seq, e.type, e.data) for e in events])

    async def _persist_many(self, grouped: dict[Key, list[Event]]) -> dict[Key, Exception]:
        rows = [(t, m, e.seq, e.type, e.data) for (t, m), events in grouped.items() for e in events]
        await self._write(rows)  # one executemany for every run's events; an error fails them all
        return {}

    async def _load_events(self, key: Key, after: int, limit: int) -> list[Event]:
        joined = await self._read(lambda c: c.execute(_LOAD_EVENTS, (*key, after, limit)).fetchone()[0])
        return _split_events(joined)

    async def _last_seq(self, key: Key) -> int:
        row = await self._read(
            lambda c: c.execute("SELECT MAX(seq) FROM events WHERE tenant = ? AND message_id = ?", key).fetchone()
        )
        return row[0] or 0

    async def _last_event(self, key: Key) -> Event | None:
        row = await self._read(
            lambda c: c.execute(
                "SELECT seq, type, data FROM events WHERE tenant = ? AND message_id = ? ORDER BY seq DESC LIMIT 1", key
            ).fetchone()
        )
        return None if row is None else Event(row[0], row[1], None, bytes(row[2]))
