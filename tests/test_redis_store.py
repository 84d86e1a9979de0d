"""Redis-specific store behaviour (the shared contract runs in test_store.py): keys, fencing, expiry, blocking follow."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from backstream.events import Event
from backstream.store import FencedOut, RunRecord
from backstream.store.redis import RedisStore
from tests.support.server import REDIS_URL


def redis_factory() -> Callable[[], RedisStore]:
    prefix = f"bstest-{uuid.uuid4().hex[:8]}"
    return lambda: RedisStore(REDIS_URL, prefix)


@pytest.fixture()
async def pair(redis_db: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one Redis: two replicas' views."""
    make = redis_factory()
    a, b = make(), make()
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


def ev(mid: str, seq: int, type_: str = "text_delta") -> Event:
    return Event.build(seq, type_, mid, delta=str(seq))


async def test_keys_share_a_hash_tag_and_prefix(pair: tuple[RedisStore, RedisStore]) -> None:
    a, _ = pair
    rec = RunRecord(tenant="acme", message_id="m1")
    assert await a.create_run(rec)
    await a.claim("acme", "m1")
    await a.append("acme", "m1", [ev("m1", 1)])
    keys = sorted([k.decode() async for k in a.redis.scan_iter(match=f"{a.prefix}:*")])
    assert keys == [
        f"{a.prefix}:run:{{acme/m1}}:events",
        f"{a.prefix}:run:{{acme/m1}}:meta",
        f"{a.prefix}:runs:{{acme}}",  # the tenant's listing index
    ]
    entries = await a.redis.xrange(a.events_key(("acme", "m1")))
    assert [(eid, f[b"t"]) for eid, f in entries] == [(b"1-0", b"text_delta")], "stream entry id = SSE position"


async def test_a_fenced_out_owner_cannot_write(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    await a.create_run(RunRecord(tenant="t", message_id="f1"))
    await a.claim("t", "f1")
    await a.append("t", "f1", [ev("f1", 1)])
    await b.claim("t", "f1")  # b takes over
    with pytest.raises(FencedOut):
        await a.append("t", "f1", [ev("f1", 2)])
    with pytest.raises(FencedOut):
        await a.update_run("t", "f1", status="completed")
    await b.append("t", "f1", [ev("f1", 2, "stream_end")])
    assert [e.seq for e in await a.read("t", "f1")] == [1, 2]
    assert (await b.get_run("t", "f1")).status == "pending"  # type: ignore[union-attr]


async def test_ended_runs_get_a_ttl(pair: tuple[RedisStore, RedisStore]) -> None:
    a, _ = pair
    await a.create_run(RunRecord(tenant="t", message_id="e1"))
    await a.claim("t", "e1")
    await a.append("t", "e1", [ev("e1", 1, "stream_end")])
    await a.update_run("t", "e1", status="completed", expires_at=time.time() + 100)
    for key in (a.meta_key(("t", "e1")), a.events_key(("t", "e1"))):
        ttl = await a.redis.pttl(key)
        assert 90_000 < ttl <= 100_000


async def test_watcher_on_another_replica_wakes_within_milliseconds(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    await a.create_run(RunRecord(tenant="t", message_id="w1"))
    await a.claim("t", "w1")
    await a.append("t", "w1", [ev("w1", 1)])
    latencies = []
    for seq in range(2, 12):
        waiter = asyncio.create_task(b.wait("t", "w1", seq - 1, timeout=5))
        await asyncio.sleep(0.02)  # let b's follower block on the stream
        t0 = time.perf_counter()
        await a.append("t", "w1", [ev("w1", seq)])
        assert await waiter is True
        latencies.append(time.perf_counter() - t0)
        assert [e.seq for e in await b.read("t", "w1", seq - 1)] == [seq]
    assert sorted(latencies)[len(latencies) // 2] < 0.02, latencies


async def test_many_remote_followers_share_one_blocking_read(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    ids = [f"r{i}" for i in range(30)]
    for mid in ids:
        await a.create_run(RunRecord(tenant="t", message_id=mid))
        await a.claim("t", mid)
    waiters = [asyncio.create_task(b.wait("t", mid, 0, timeout=5)) for mid in ids]
    await asyncio.sleep(0.05)
    clients_before = len(await b.redis.client_list())
    for mid in ids:
        await a.append("t", mid, [ev(mid, 1)])
    assert all(await asyncio.gather(*waiters))
    assert len(await b.redis.client_list()) <= clients_before + 1, "no connection per watched run"


async def test_group_commit_reports_a_fenced_out_run(pair: tuple[RedisStore, RedisStore]) -> None:
    a, b = pair
    for mid in ("ok", "lost"):
        await a.create_run(RunRecord(tenant="t", message_id=mid))
        await a.claim("t", mid)
    await b.claim("t", "lost")
    a.enqueue("t", "ok", ev("ok", 1))
    a.enqueue("t", "lost", ev("lost", 1))
    await a.sync("t", "ok")
    with pytest.raises(FencedOut):
        await a.sync("t", "lost")
    assert [e.seq for e in await b.read("t", "ok")] == [1]
    assert await b.read("t", "lost") == []
    with pytest.raises(FencedOut):
        a.enqueue("t", "lost", ev("lost", 2))


async def test_watchers_reads_cannot_starve_a_runs_writes(redis_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every read connection busy (thousands of watchers replaying) and a run still stores its events and
    its status at once: writes have a pool of their own. With one shared pool the append waited for a
    read connection and, past the pool's timeout, the run ended in error ("No connection available")."""
    from backstream.store import redis as redis_store

    monkeypatch.setattr(redis_store, "READ_CONNECTIONS", 2)
    store = redis_factory()()
    await store.open()
    try:
        await store.create_run(RunRecord(tenant="t", message_id="w1"))
        await store.claim("t", "w1")
        # Blocking reads hold both read connections for 3 s, as a crowd of slow watchers would.
        busy = [asyncio.ensure_future(store.reads.blpop([f"{store.prefix}:nothing:{i}"], timeout=3)) for i in (1, 2)]
        await _until_blocked(store, 2)
        started = time.monotonic()
        store.enqueue("t", "w1", ev("w1", 1))
        await store.sync("t", "w1")
        await store.update_run("t", "w1", status="processing")
        assert time.monotonic() - started < 1.0, "the run's writes did not wait for the watchers' reads"
        assert [e.seq for e in await store.read("t", "w1")] == [1]
        await asyncio.gather(*busy)
    finally:
        await store.close()


async def _until_blocked(store: RedisStore, count: int) -> None:
    """Until Redis reports `count` clients blocked in BLPOP (a state only Redis can tell; polled, bounded)."""
    deadline = time.monotonic() + 5
    blocked = 0
    while blocked < count and time.monotonic() < deadline:
        blocked = sum(c.get("cmd") == "blpop" for c in await store.redis.client_list())
        await asyncio.sleep(0.01)  # noqa: ASYNC110 - there is no event to await: Redis is asked
    assert blocked >= count


async def _unblock_calls(store: RedisStore) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_client|unblock", {}).get("calls", 0))


async def test_watchers_attaching_at_once_share_the_follower_unblock(pair: tuple[RedisStore, RedisStore]) -> None:
    """300 watchers of 300 remote runs attach in one burst: the follower is interrupted a few times, not
    once per watcher (each CLIENT UNBLOCK took a pooled connection: a burst took them all)."""
    a, b = pair
    ids = [f"u{i}" for i in range(300)]
    for mid in ids:
        await a.create_run(RunRecord(tenant="t", message_id=mid))
        await a.claim("t", mid)
    await b.wait("t", "u0", 0, timeout=0.05)  # the follower is running and blocked in its XREAD
    before = await _unblock_calls(b)
    waiters = [asyncio.create_task(b.wait("t", mid, 0, timeout=5)) for mid in ids]
    for mid in ids:
        await a.append("t", mid, [ev(mid, 1)])
    assert all(await asyncio.gather(*waiters)), "every watcher woke by its event, none by the timeout"
    assert await _unblock_calls(b) - before < 30


async def _xrange_calls(store: RedisStore) -> int:
    stats = await store.redis.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def test_remote_watchers_share_the_followers_reads(pair: tuple[RedisStore, RedisStore]) -> None:
    """Watchers on a replica that does not run the run: the follower's XREAD feeds their tail, so each
    live event is read from Redis about once, not once per watcher (it was an XRANGE per watcher per event)."""
    from backstream.background.watch import follow_run

    a, b = pair
    await a.create_run(RunRecord(tenant="t", message_id="shared"))
    await a.claim("t", "shared")
    await a.append("t", "shared", [ev("shared", 1)])

    async def watcher() -> list[int]:
        seen: list[int] = []
        async for frames in follow_run(b, "t", "shared", 0):
            seen += [int(line[4:]) for line in frames.split(b"\n") if line.startswith(b"id: ")]
        return seen

    def all_waiting() -> bool:  # every watcher has what there is and waits for more
        tail = b._tail_of(("t", "shared"))
        return tail is not None and len(tail._waiters) == 20

    watchers = [asyncio.create_task(watcher()) for _ in range(20)]
    await _until(all_waiting)
    before = await _xrange_calls(b)
    for seq in range(2, 12):
        await a.append("t", "shared", [ev("shared", seq)])
        await _until(all_waiting)
    await a.append("t", "shared", [ev("shared", 12, "stream_end")])
    assert [await w for w in watchers] == [list(range(1, 13))] * 20
    assert await _xrange_calls(b) - before < 20, "live events came from the shared tail"


async def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Until a store's in-memory state says so (it has no event to await for it); bounded."""
    deadline = time.monotonic() + timeout
    while not condition():  # noqa: ASYNC110 - polled state, not an event
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)
