"""The StreamStore contract, run against every backend (a real SQLite file; Redis in test_redis_store)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from backstream.events import Event
from backstream.store import RunQuery, RunRecord, StreamStore
from backstream.store.memory import MemoryStore
from backstream.store.sqlite import SQLiteStore

StoreFactory = Callable[[], StreamStore]


def make_factory(kind: str, tmp_path: Path) -> StoreFactory:
    if kind == "memory":
        shared = MemoryStore()
        return lambda: shared
    if kind == "sqlite":
        return lambda: SQLiteStore(tmp_path / "store.db")
    from tests.test_redis_store import redis_factory

    return redis_factory()


BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture(params=BACKENDS)
async def factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    if request.param == "redis":
        request.getfixturevalue("redis_db")  # the suite's Redis database, emptied before its first use
    yield make_factory(request.param, tmp_path)


@pytest.fixture()
async def store(factory: StoreFactory) -> AsyncIterator[StreamStore]:
    s = factory()
    await s.open()
    yield s
    await s.close()


def events(mid: str, start: int, n: int, last: bool = False) -> list[Event]:
    out = [Event.build(start + i, "text_delta", mid, delta=f"d{start + i}") for i in range(n)]
    if last:
        out[-1] = Event.build(start + n - 1, "stream_end", mid, finish_reason="Stop")
    return out


def record(mid: str, tenant: str = "t1", **kw: object) -> RunRecord:
    return RunRecord(tenant=tenant, message_id=mid, request=b'{"messages": []}', **kw)  # type: ignore[arg-type]


async def test_create_get_update(store: StreamStore) -> None:
    r = record("m1", metadata={"model": "gpt", "priority": 3}, priority=3, model="gpt")
    assert await store.create_run(r) is True
    assert await store.create_run(record("m1")) is False, "an existing id is not overwritten"
    got = await store.get_run("t1", "m1")
    assert got is not None
    assert (got.status, got.metadata, got.priority, got.model, got.request) == (
        "pending",
        {"model": "gpt", "priority": 3},
        3,
        "gpt",
        b'{"messages": []}',
    )
    assert abs(got.created_at - time.time()) < 5
    await store.update_run(
        "t1", "m1", status="completed", completed_at=123.0, error_message=None, metadata={"usage": {"a": 1}}
    )
    got = await store.get_run("t1", "m1")
    assert (
        got is not None
        and got.status == "completed"
        and got.completed_at == 123.0
        and got.metadata == {"usage": {"a": 1}}
    )
    assert await store.get_run("t1", "nope") is None


async def test_tenants_are_separate(store: StreamStore) -> None:
    assert await store.create_run(record("same", tenant="a"))
    assert await store.create_run(record("same", tenant="b")), "the same id in another tenant is another run"
    await store.claim("a", "same")
    await store.append("a", "same", events("same", 1, 3))
    assert len(await store.read("a", "same")) == 3
    assert await store.read("b", "same") == []
    assert await store.get_run("c", "same") is None
    assert await store.delete_run("b", "same")
    assert await store.get_run("a", "same") is not None


async def test_append_read_after_cursor(store: StreamStore) -> None:
    await store.create_run(record("m2"))
    await store.claim("t1", "m2")
    await store.append("t1", "m2", events("m2", 1, 5))
    await store.append("t1", "m2", events("m2", 6, 5, last=True))
    got = await store.read("t1", "m2", after=0)
    assert [e.seq for e in got] == list(range(1, 11))
    assert got[0].frame_bytes().startswith(b"id: 1\nevent: text_delta\ndata: {")
    assert [e.seq for e in await store.read("t1", "m2", after=7)] == [8, 9, 10]
    assert [e.seq for e in await store.read("t1", "m2", after=2, limit=3)] == [3, 4, 5]
    assert await store.read("t1", "m2", after=10) == []
    assert await store.last_seq("t1", "m2") == 10


async def test_events_survive_reopen_and_cold_reads_match(
    factory: StoreFactory, request: pytest.FixtureRequest
) -> None:
    s1 = factory()
    await s1.open()
    await s1.create_run(record("m3"))
    await s1.claim("t1", "m3")
    await s1.append("t1", "m3", events("m3", 1, 20, last=True))
    hot = [(e.seq, e.type, e.data) for e in await s1.read("t1", "m3")]
    await s1.close()
    s2 = factory()
    await s2.open()
    try:
        cold = [(e.seq, e.type, e.data) for e in await s2.read("t1", "m3")]
        assert cold == hot
        assert await s2.last_seq("t1", "m3") == 20
    finally:
        await s2.close()


async def test_wait_wakes_on_append_and_times_out(store: StreamStore) -> None:
    await store.create_run(record("m4"))
    await store.claim("t1", "m4")
    waiter = asyncio.create_task(store.wait("t1", "m4", 0, timeout=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    t0 = time.monotonic()
    await store.append("t1", "m4", events("m4", 1, 1))
    assert await waiter is True
    assert time.monotonic() - t0 < 0.5
    assert await store.wait("t1", "m4", 1, timeout=0.1) is False
    assert await store.wait("t1", "m4", 0, timeout=0.1) is True, "already past the cursor"


async def test_delete_wakes_waiters_and_removes_everything(store: StreamStore) -> None:
    await store.create_run(record("m5"))
    await store.claim("t1", "m5")
    await store.append("t1", "m5", events("m5", 1, 3))
    waiter = asyncio.create_task(store.wait("t1", "m5", 3, timeout=5))
    await asyncio.sleep(0.05)
    assert await store.delete_run("t1", "m5") is True
    assert await asyncio.wait_for(waiter, 2) is True
    assert await store.get_run("t1", "m5") is None
    assert await store.read("t1", "m5") == []
    assert await store.delete_run("t1", "m5") is False


async def test_expire_only_removes_expired(store: StreamStore) -> None:
    now = time.time()
    await store.create_run(record("old", status="completed", expires_at=now - 1))
    await store.create_run(record("new", status="completed", expires_at=now + 100))
    await store.create_run(record("live"))
    await store.claim("t1", "old")
    await store.append("t1", "old", events("old", 1, 2))
    if store.name == "redis":  # Redis expires keys itself, from the TTL set when the run ends
        await store.update_run("t1", "old", status="completed", expires_at=now + 0.05)
        await store.update_run("t1", "new", status="completed", expires_at=now + 100)
        store.release("t1", "old")  # the owner lets go when the run ends, as the scheduler does
        await asyncio.sleep(0.2)
    else:
        assert await store.expire(now) == 1
    assert await store.get_run("t1", "old") is None and await store.read("t1", "old") == []
    assert await store.get_run("t1", "new") is not None and await store.get_run("t1", "live") is not None


async def test_unfinished_lists_pending_and_processing(store: StreamStore) -> None:
    await store.create_run(record("p"))
    await store.create_run(record("r", status="processing"))
    await store.create_run(record("d", status="completed"))
    await store.create_run(record("x", status="error"))
    found = sorted(r.message_id for r in await store.unfinished() if r.tenant == "t1")
    # With Redis, unfinished runs are found through leases and the work queue instead (test_replicas.py).
    assert found == ([] if store.name == "redis" else ["p", "r"])


async def test_many_runs_appending_concurrently(store: StreamStore) -> None:
    n_runs, per_run = 50, 40
    for i in range(n_runs):
        await store.create_run(record(f"c{i}"))
        await store.claim("t1", f"c{i}")

    async def produce(i: int) -> None:
        for seq in range(1, per_run + 1):
            await store.append("t1", f"c{i}", events(f"c{i}", seq, 1))

    await asyncio.gather(*(produce(i) for i in range(n_runs)))
    for i in range(n_runs):
        assert [e.seq for e in await store.read("t1", f"c{i}", limit=1000)] == list(range(1, per_run + 1))


async def test_concurrent_first_waiters_all_wake(store: StreamStore) -> None:
    # Several watchers arriving together at a run with no events yet: none may be left behind.
    await store.create_run(record("m6"))
    await store.claim("t1", "m6")
    waiters = [asyncio.create_task(store.wait("t1", "m6", 0, timeout=3)) for _ in range(5)]
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await store.append("t1", "m6", events("m6", 1, 1))
    assert await asyncio.gather(*waiters) == [True] * 5
    assert time.monotonic() - t0 < 1


async def test_group_commit_keeps_each_runs_order(store: StreamStore) -> None:
    ids = [f"g{i}" for i in range(20)]
    for mid in ids:
        await store.create_run(record(mid))
        await store.claim("t1", mid)
    waiter = asyncio.create_task(store.wait("t1", "g3", 0, timeout=3))
    for seq in range(1, 31):
        for mid in ids:
            store.enqueue("t1", mid, events(mid, seq, 1)[0])
        if seq % 7 == 0:
            await asyncio.sleep(0)  # let commits interleave with new events
    await asyncio.gather(*(store.sync("t1", mid) for mid in ids))
    assert await waiter is True
    for mid in ids:
        assert [e.seq for e in await store.read("t1", mid, limit=100)] == list(range(1, 31))


# --- listing (GET /v1/messages/async) -------------------------------------------------------


async def page_ids(store: StreamStore, tenant: str, query: RunQuery) -> tuple[list[str], RunQuery | None]:
    """One page of ids, and the query of the next page (None: the last) as the HTTP layer builds it."""
    got = await store.list_runs(tenant, RunQuery(**{**query.__dict__, "limit": query.limit + 1}))
    page = got[: query.limit]
    if len(got) <= query.limit:
        return [r.message_id for r in page], None
    last = page[-1]
    return [r.message_id for r in page], RunQuery(**{**query.__dict__, "before": (last.created_at, last.message_id)})


async def test_listing_is_newest_first_with_ties_by_id(store: StreamStore) -> None:
    base = time.time() - 100
    for mid, at in [("a", 1.0), ("b", 2.0), ("c", 2.0), ("d", 3.0)]:
        assert await store.create_run(record(mid, created_at=base + at))
    got = await store.list_runs("t1", RunQuery())
    assert [r.message_id for r in got] == ["d", "c", "b", "a"]
    assert got[0].status == "pending" and got[0].created_at == base + 3.0 and got[0].tenant == "t1"
    assert [r.message_id for r in await store.list_runs("t1", RunQuery(limit=2))] == ["d", "c"]
    assert [r.message_id for r in await store.list_runs("t1", RunQuery(before=(base + 2.0, "c")))] == ["b", "a"]


async def test_listing_pages_are_stable_under_inserts_and_deletes(store: StreamStore) -> None:
    base = time.time() - 1000
    ids = [f"r{i:02d}" for i in range(10)]
    for i, mid in enumerate(ids):
        # pairs share a created_at: ties must be cut by id, never repeated or skipped across pages
        assert await store.create_run(record(mid, created_at=base + i // 2))
    seen, query = await page_ids(store, "t1", RunQuery(limit=3))
    assert seen == ["r09", "r08", "r07"]
    # Between pages: newer runs arrive, a seen run and an unseen one go.
    await store.create_run(record("new1", created_at=base + 500))
    await store.create_run(record("z", created_at=base + 3))  # r07's created_at, an id sorting before it
    assert await store.delete_run("t1", "r08") and await store.delete_run("t1", "r04")
    while query is not None:
        more, query = await page_ids(store, "t1", query)
        seen += more
    assert seen == ["r09", "r08", "r07", "r06", "r05", "r03", "r02", "r01", "r00"], "no repeat, no skip"
    assert len(set(seen)) == len(seen)
    everything, _ = await page_ids(store, "t1", RunQuery(limit=100))
    assert everything[:4] == ["new1", "r09", "z", "r07"] and "r08" not in everything


async def test_listing_is_per_tenant(store: StreamStore) -> None:
    await store.create_run(record("mine", tenant="a"))
    await store.create_run(record("theirs", tenant="b"))
    await store.create_run(record("same", tenant="a"))
    await store.create_run(record("same", tenant="b"))
    assert sorted(r.message_id for r in await store.list_runs("a", RunQuery())) == ["mine", "same"]
    assert {r.tenant for r in await store.list_runs("b", RunQuery())} == {"b"}
    assert await store.list_runs("c", RunQuery()) == []
    assert await store.delete_run("b", "same")
    assert sorted(r.message_id for r in await store.list_runs("a", RunQuery())) == ["mine", "same"]


async def test_listing_filters(store: StreamStore) -> None:
    base = time.time() - 100
    runs = [
        ("p", "pending", "m1", 1),
        ("c1", "completed", "m1", 2),
        ("c2", "completed", "m2", 3),
        ("e", "error", "m2", 4),
    ]
    for mid, status, model, at in runs:
        await store.create_run(record(mid, status=status, model=model, created_at=base + at))

    async def ids(**kw: object) -> list[str]:
        return [r.message_id for r in await store.list_runs("t1", RunQuery(**kw))]  # type: ignore[arg-type]

    assert await ids(status="completed") == ["c2", "c1"]
    assert await ids(model="m2") == ["e", "c2"]
    assert await ids(status="completed", model="m1") == ["c1"]
    assert await ids(created_after=base + 2) == ["e", "c2", "c1"], "created_after is inclusive"
    assert await ids(created_before=base + 3) == ["c1", "p"], "created_before is exclusive"
    assert await ids(created_after=base + 2, created_before=base + 4, status="completed") == ["c2", "c1"]
    assert await ids(status="cancelled") == []
    await store.update_run("t1", "p", status="cancelled")
    assert await ids(status="cancelled") == ["p"], "the status filter sees the current status"
    # A filter that skips most runs still fills the page (Redis reads its index in batches).
    for i in range(120):
        await store.create_run(record(f"x{i:03d}", status="pending", model="m3", created_at=base + 10 + i))
    assert await ids(status="completed", limit=2) == ["c2", "c1"]
    assert len(await ids(model="m3", limit=100)) == 100


async def test_sqlite_writes_keep_pace_beside_a_busy_interpreter(tmp_path: Path) -> None:
    """The writer thread shares the GIL with a busy event loop. Stepping once per row (executemany) handed
    the GIL over per event, each hand-back waiting up to the 5 ms switch interval: 2,000 events took
    seconds. Multi-row INSERTs step once per chunk."""
    store = SQLiteStore(tmp_path / "busy.db")
    await store.open()
    try:
        await store.create_run(RunRecord(tenant="t", message_id="busy"))
        with busy_interpreter():
            started = time.monotonic()
            await store.append(
                "t", "busy", [Event.build(i, "text_delta", "busy", delta="x" * 100) for i in range(1, 2001)]
            )
            elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert elapsed < 2.0, f"2,000 events took {elapsed:.1f} s beside a busy thread"


async def test_sqlite_reads_keep_pace_beside_a_busy_interpreter_and_round_trip(tmp_path: Path) -> None:
    """A run's events come back in one row (row-by-row fetching let go of the GIL per row: 512 events
    took ~0.4 s beside a busy thread); separators and any text survive the round trip."""
    store = SQLiteStore(tmp_path / "reads.db")
    await store.open()
    tricky = "\x1e\x1f\n\u2028 é 🎉 \\u001e"
    events = [Event.build(i, "text_delta", "r", delta=f"{i}{tricky}") for i in range(1, 513)]
    await store.create_run(RunRecord(tenant="t", message_id="r"))
    await store.append("t", "r", events)
    try:
        with busy_interpreter():
            started = time.monotonic()
            for _ in range(5):
                loaded = await store.read_stored("t", "r", 0, 512)
            elapsed = time.monotonic() - started
    finally:
        await store.close()
    assert [(e.seq, e.type, e.data) for e in loaded] == [(e.seq, e.type, e.data) for e in events]
    assert elapsed < 1.0, f"five reads of 512 events took {elapsed:.2f} s beside a busy thread"


@contextlib.contextmanager
def busy_interpreter() -> Iterator[None]:
    """Another thread running pure Python meanwhile, as a loaded event loop does (the GIL is contended)."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()
