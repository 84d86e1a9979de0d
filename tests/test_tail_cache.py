"""Finished runs leave memory (issue 13): a run's in-memory tail is a cache, never the record.

- a run's tail goes once the run is over here and its last watcher has left; replays of
  finished runs read the store;
- all tails together stay within `runs.tail_cache_bytes`, least recently published first,
  tails nobody watches before watched ones; a watcher whose cursor is older than its tail
  reads the store, so a live watcher still sees every event;
- an event's bytes take their own size (orjson 3.12+ hands back 4 KiB buffers for 150-byte
  events, which the tails then kept).

In-process, on the memory and SQLite stores; the executor test runs real background runs
against the fake upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backstream.api_models import ChatRequest
from backstream.background.watch import follow_run
from backstream.config import Settings
from backstream.deployment import Deployment, build_deployment
from backstream.events import Event
from backstream.model_table import ModelTable
from backstream.store import StreamStore
from backstream.store.memory import MemoryStore
from backstream.store.sqlite import SQLiteStore
from tests.support.fake_upstream import FakeUpstream
from tests.test_store import events, record

T = "t1"


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StreamStore]:
    s: StreamStore = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "store.db")
    await s.open()
    yield s
    await s.close()


def held(store: StreamStore) -> tuple[int, int]:
    """(events, bytes of their JSON) that the store's tails hold now."""
    tails = list(store._tails.values())
    return sum(len(t.events) for t in tails), sum(len(e.data) for t in tails for e in t.events)


async def write(store: StreamStore, mid: str, evs: list[Event], new: bool = True) -> None:
    """As a running run does: events into the group commit, then wait until they are durable (and published)."""
    if new:
        await store.create_run(record(mid))
        await store.claim(T, mid)
    for e in evs:
        store.enqueue(T, mid, e)
    await store.sync(T, mid)


async def full_log(store: StreamStore, mid: str) -> list[tuple[int, str, bytes]]:
    return [(e.seq, e.type, e.data) for e in await store.read(T, mid, 0, 10_000)]


def as_log(evs: list[Event]) -> list[tuple[int, str, bytes]]:
    return [(e.seq, e.type, e.data) for e in evs]


async def collect(store: StreamStore, mid: str, cursor: int = 0) -> bytes:
    return b"".join([frames async for frames in follow_run(store, T, mid, cursor)])


def frame_ids(raw: bytes) -> list[int]:
    return [int(line[4:]) for line in raw.split(b"\n") if line.startswith(b"id: ")]


async def test_an_unwatched_runs_tail_goes_when_the_run_ends(store: StreamStore) -> None:
    evs = events("a", 1, 70, last=True)
    await write(store, "a", evs)
    assert store._tail_of((T, "a")) is not None, "while the run writes, its tail serves watchers"
    store.release(T, "a")  # the run is over here
    assert store._tail_of((T, "a")) is None
    assert held(store) == (0, 0) and store.cached_bytes == 0
    assert await full_log(store, "a") == as_log(evs), "a replay of a finished run reads the store"
    assert frame_ids(await collect(store, "a")) == list(range(1, 71))
    assert store._tail_of((T, "a")) is None, "a late watcher does not bring the tail back"


async def test_a_finished_runs_tail_stays_while_watched_and_goes_with_its_last_watcher(store: StreamStore) -> None:
    key = (T, "w")
    evs = events("w", 1, 70, last=True)
    await write(store, "w", evs[:10])
    live = asyncio.create_task(collect(store, "w"))  # a watcher following live
    await asyncio.sleep(0.05)
    with store.watching(T, "w"):  # a second watcher, still sending when the run ends
        await write(store, "w", evs[10:], new=False)
        store.release(T, "w")
        assert frame_ids(await asyncio.wait_for(live, 5)) == list(range(1, 71))
        tail = store._tail_of(key)
        assert tail is not None and len(tail.events) == 70, "kept while somebody still watches"
    assert store._tail_of(key) is None, "the last watcher of a finished run takes its tail with it"
    assert held(store) == (0, 0) and store.cached_bytes == 0
    assert await full_log(store, "w") == as_log(evs)


async def test_a_live_runs_tail_outlives_a_watcher_that_leaves(store: StreamStore) -> None:
    await write(store, "l", events("l", 1, 5))
    with store.watching(T, "l"):
        assert [e.seq for e in await store.read(T, "l")] == [1, 2, 3, 4, 5]
    tail = store._tail_of((T, "l"))
    assert tail is not None and len(tail.events) == 5, "the run goes on: the next watcher reads it from memory"


async def test_tails_stay_within_the_byte_budget_and_evicted_runs_read_the_store(store: StreamStore) -> None:
    budget = 256 * 1024
    store.tail_cache_bytes = budget
    logs: dict[str, list[Event]] = {}
    with contextlib.ExitStack() as watchers:
        for i in range(200):  # finished runs whose watchers have not left yet
            mid = f"f{i}"
            watchers.enter_context(store.watching(T, mid))
            logs[mid] = events(mid, 1, 70, last=True)
            await write(store, mid, logs[mid])
            store.release(T, mid)
            assert held(store)[1] <= budget
            assert store.cached_bytes <= budget
        from backstream.store.tail import cost

        tails = list(store._tails.values())
        assert store.cached_bytes == sum(t.bytes for t in tails) == sum(cost(t.events) for t in tails)
        newest = store._tail_of((T, "f199"))
        assert newest is not None and len(newest.events) == 70, "the most recent runs are still served from memory"
        for mid, evs in logs.items():
            assert await full_log(store, mid) == as_log(evs), mid
    assert held(store) == (0, 0) and store.cached_bytes == 0, "every watcher left: every finished tail went"


async def test_idle_tails_are_evicted_before_watched_ones(store: StreamStore) -> None:
    store.tail_cache_bytes = 128 * 1024
    with store.watching(T, "hot"):
        await write(store, "hot", events("hot", 1, 20))  # published first: the oldest tail
        for i in range(100):  # live runs nobody watches
            await write(store, f"idle{i}", events(f"idle{i}", 1, 70))
            assert store.cached_bytes <= store.tail_cache_bytes
        hot = store._tail_of((T, "hot"))
        assert hot is not None and [e.seq for e in hot.events] == list(range(1, 21))
        assert held(store)[1] <= store.tail_cache_bytes


async def test_a_live_watcher_sees_every_event_while_tails_are_evicted(store: StreamStore) -> None:
    store.tail_cache_bytes = 4096  # smaller than one read: every tail is emptied again and again
    others = [f"o{i}" for i in range(20)]
    for mid in ["live", *others]:
        await store.create_run(record(mid))
        await store.claim(T, mid)
    log = events("live", 1, 300, last=True)
    watcher = asyncio.create_task(collect(store, "live"))
    for seq in range(1, 301):
        store.enqueue(T, "live", log[seq - 1])
        for mid in others:
            store.enqueue(T, mid, events(mid, seq, 1)[0])
        if seq % 3 == 0:
            await asyncio.sleep(0)  # let commits, publishes and the watcher interleave
            assert store.cached_bytes <= store.tail_cache_bytes and held(store)[1] <= store.tail_cache_bytes
    await asyncio.gather(*(store.sync(T, mid) for mid in ["live", *others]))
    store.release(T, "live")
    raw = await asyncio.wait_for(watcher, 10)
    assert frame_ids(raw) == list(range(1, 301)), "no gap, no repeat"
    assert raw == b"".join(e.frame_bytes() for e in log)


def test_built_event_bytes_take_their_own_size() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [
            Event.build(i, "text_delta", "msg_01KB4Q0Z5W3G8H2T7N6V9X0Y1Z", delta=" token").data for i in range(2000)
        ]
        per_event = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_event < 2 * (len(kept[0]) + 64), f"{per_event:.0f} bytes held per {len(kept[0])}-byte event"


# --- the executor: real background runs against the fake upstream ---------------------------


@pytest.fixture(params=["memory", "sqlite"])
async def deployment(request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path: Path) -> AsyncIterator[Deployment]:
    model = {
        "name": "fake",
        "provider": "openai",
        "base_url": fake.base_url,
        "model": "tokens=30;delay_ms=1",
        "retries": 0,
    }
    settings = Settings(store=request.param, data_dir=str(tmp_path), default_model="fake", models=[model])
    models = ModelTable(settings)
    dep = build_deployment(settings, models)
    await dep.store.open()
    await dep.start()
    yield dep
    await dep.stop()
    await dep.store.close()
    await models.aclose()


async def test_finished_background_runs_leave_no_tails(deployment: Deployment) -> None:
    dep = deployment
    store = dep.store
    chat = ChatRequest.model_validate(
        {"model": "fake", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    )
    config = dep.executor.models.resolve("fake")
    ids = [f"run{i}" for i in range(12)]
    watched = asyncio.create_task(asyncio.sleep(0))
    for i, mid in enumerate(ids):
        await dep.runs.submit(T, "anonymous", mid, chat, config, chat.model_dump_json().encode())
        if i == 0:
            watched = asyncio.create_task(collect(store, mid))  # one run has a watcher, like a client
    await asyncio.wait(list(dep.executor._tasks.values()), timeout=20)  # each run's task ends after its ending
    ids_seen = frame_ids(await asyncio.wait_for(watched, 10))
    assert ids_seen and ids_seen == list(range(1, len(ids_seen) + 1))
    for mid in ids:
        record_ = await store.get_run(T, mid)
        assert record_ is not None and record_.status == "completed"
        assert [e.seq for e in await store.read(T, mid, 0, 1000)] == list(range(1, record_.event_count + 1))
    assert store._tails == {}, "no finished run keeps a tail once nobody watches it"
    assert store.cached_bytes == 0


async def test_long_waits_share_one_sweep_not_a_timer_each() -> None:
    """Watchers wait once per event: long waits get no timer of their own (tail.py), yet still time out."""
    from backstream.store import tail as tail_module

    loop = asyncio.get_running_loop()
    woken, idle = tail_module.Tail(), tail_module.Tail()
    timeout = tail_module.COARSE_AFTER_S
    handles_before = len(getattr(loop, "_scheduled", ()))
    started = loop.time()
    waits = [asyncio.ensure_future(woken.wait(timeout)) for _ in range(100)]
    quiet = asyncio.ensure_future(idle.wait(timeout))
    await asyncio.sleep(0)  # every wait registered
    if hasattr(loop, "_scheduled"):  # the default loop exposes its timers: at most the one sweep was added
        assert len(loop._scheduled) <= handles_before + 1
    woken.wake()
    assert await asyncio.gather(*waits) == [True] * 100 and not woken.watched
    assert await quiet is False, "a long wait still times out, through the sweep"
    assert timeout - 0.01 <= loop.time() - started <= timeout + tail_module.SWEEP_S + 0.5
    assert not idle.watched
    assert await tail_module.Tail().wait(0.05) is False, "short waits keep an exact timer"
