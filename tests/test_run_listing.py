"""Run listing (`GET /v1/messages/async`) over real HTTP on every store, through the client and the CLI,
plus the Redis index kept in step with deletes, key expiry and retention."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from backstream import Client
from backstream.store import RunQuery
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import wait_status
from tests.support.server import SECRETS, ServerProcess, fake_models
from tests.test_cli import bs
from tests.test_store import record

KEY_ACME = "bsk_test_listing_acme_0123456789abcdef"
KEY_GLOBEX = "bsk_test_listing_globex_0123456789abcd"
SECRETS.update({KEY_ACME, KEY_GLOBEX})
ASYNC = "/v1/messages/async"
DONE = {"completed", "failed", "cancelled", "error"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def since_now() -> str:
    """A created_after bound that keeps out the runs of other tests on the shared server."""
    time.sleep(0.01)
    return iso(time.time())


def run(c: httpx.Client, fake: FakeUpstream, mid: str, headers: dict[str, str] | None = None) -> None:
    fake.script("gpt-up", Reply(tokens=["ok"]))
    resp = c.post(
        ASYNC,
        params={"message_id": mid},
        headers=headers,
        json={"model": "gpt", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status_code == 200, resp.text


def page(c: httpx.Client, **params: Any) -> dict[str, Any]:
    resp = c.get(ASYNC, params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"data", "next_cursor"}
    return body


def test_pages_stay_stable_under_inserts_and_deletes(bg: httpx.Client, fake: FakeUpstream) -> None:
    after = since_now()
    tag = f"ls{time.monotonic_ns()}"
    ids = [f"{tag}-{i}" for i in range(5)]
    for mid in ids:
        run(bg, fake, mid)
        wait_status(bg, mid, DONE)
    first = page(bg, created_after=after, limit=2)
    assert [r["message_id"] for r in first["data"]] == [ids[4], ids[3]], "newest first"
    assert first["data"][0] == bg.get(f"{ASYNC}/{ids[4]}/status").json(), "items are status objects"
    # Between pages: a newer run starts, a listed run and an unlisted one are deleted.
    run(bg, fake, f"{tag}-new")
    assert bg.delete(f"{ASYNC}/{ids[4]}").status_code == 204
    assert bg.delete(f"{ASYNC}/{ids[2]}").status_code == 204
    seen = [r["message_id"] for r in first["data"]]
    cursor = first["next_cursor"]
    while cursor:
        body = page(bg, created_after=after, limit=2, cursor=cursor)
        seen += [r["message_id"] for r in body["data"]]
        cursor = body["next_cursor"]
    assert seen == [ids[4], ids[3], ids[1], ids[0]], "no repeat, no skip"
    everything = [r["message_id"] for r in page(bg, created_after=after, limit=100)["data"]]
    assert everything == [f"{tag}-new", ids[3], ids[1], ids[0]]
    completed = page(bg, created_after=after, status="completed", model="gpt")["data"]
    assert {r["message_id"] for r in completed} <= set(everything) and all(
        r["status"] == "completed" for r in completed
    )
    assert page(bg, created_after=after, status="cancelled")["data"] == []
    earlier = {r["message_id"] for r in page(bg, created_before=after, limit=100)["data"]}
    assert not earlier & set(everything), "created_before is exclusive of the runs created after it"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"status": "done"}, "status"),
        ({"model": "no-such-model"}, "model"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-13-01"}, "created_before"),
        ({"cursor": "not a cursor!"}, "cursor"),
        ({"cursor": "WzEsMl0"}, "cursor"),  # base64url of [1,2]: decodes, but is not ours
    ],
)
def test_bad_parameters_are_422_naming_the_field(http: httpx.Client, params: dict[str, str], field: str) -> None:
    resp = http.get(ASYNC, params=params)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["details"][0]["field"] == field, error


def test_limit_defaults_to_20(http: httpx.Client, fake: FakeUpstream) -> None:
    after = since_now()
    for i in range(21):
        run(http, fake, f"lim{time.monotonic_ns()}-{i}")
    body = page(http, created_after=after)
    assert len(body["data"]) == 20 and body["next_cursor"]
    rest = page(http, created_after=after, cursor=body["next_cursor"])
    assert len(rest["data"]) == 1 and rest["next_cursor"] is None


@pytest.fixture(scope="module")
def two_tenants(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = [
        {"name": "acme", "sha256": hashlib.sha256(KEY_ACME.encode()).hexdigest(), "tenants": ["acme"]},
        {"name": "globex", "sha256": hashlib.sha256(KEY_GLOBEX.encode()).hexdigest(), "tenants": ["globex"]},
    ]
    config = {"store": "sqlite", "models": fake_models(fake), "auth": {"api_keys": keys}}
    srv = ServerProcess(tmp_path_factory.mktemp("listing"), config, name="listing").start()
    yield srv
    srv.stop()


def test_another_tenants_runs_are_never_listed(two_tenants: ServerProcess, fake: FakeUpstream) -> None:
    acme = {"Authorization": f"Bearer {KEY_ACME}"}
    globex = {"Authorization": f"Bearer {KEY_GLOBEX}"}
    with two_tenants.client() as c:
        run(c, fake, "acme-1", acme)
        run(c, fake, "shared-id", acme)
        run(c, fake, "shared-id", globex)
        run(c, fake, "globex-1", globex)

        def ids(headers: dict[str, str]) -> list[str]:
            resp = c.get(ASYNC, headers=headers, params={"limit": 100})
            assert resp.status_code == 200, resp.text
            return sorted(r["message_id"] for r in resp.json()["data"])

        assert ids(acme) == ["acme-1", "shared-id"]
        assert ids(globex) == ["globex-1", "shared-id"]
        assert c.get(ASYNC).status_code == 401, "listing needs credentials like every other route"
        with Client(two_tenants.url, api_key=KEY_GLOBEX) as client:
            assert sorted(r["message_id"] for r in client.list(limit=1)) == ["globex-1", "shared-id"]


def test_client_list_and_cli_follow_real_pages(server: ServerProcess, fake: FakeUpstream) -> None:
    after = since_now()
    tag = f"cl{time.monotonic_ns()}"
    with server.client() as c:
        for i in range(5):
            run(c, fake, f"{tag}-{i}")
            wait_status(c, f"{tag}-{i}", DONE)
    expected = [f"{tag}-{i}" for i in reversed(range(5))]
    with Client(server.url) as client:
        assert [r["message_id"] for r in client.list(created_after=after, limit=2)] == expected
        completed = list(client.list(created_after=after, status="completed", limit=100))
        assert [r["message_id"] for r in completed] == expected
    out = bs("runs", "list", "--json", "--limit", "2", "--created-after", after, url=server.url).stdout
    assert [r["message_id"] for r in orjson.loads(out)] == expected
    text = bs("runs", "list", "--limit", "2", "--created-after", after, url=server.url).stdout
    assert all(mid in text for mid in expected), text


# --- the Redis index ------------------------------------------------------------------------


async def test_redis_index_follows_delete_expiry_and_retention(redis_db: str) -> None:
    from tests.test_redis_store import redis_factory

    store = redis_factory()()
    await store.open()
    try:
        old = time.time() - 3600  # older than the grace a run being created gets
        for mid in ("a", "b", "c"):
            assert await store.create_run(record(mid, created_at=old + ord(mid)))
        index = store.keys.runs_index("t1")
        assert await store.redis.zcard(index) == 3
        assert await store.delete_run("t1", "a")
        assert await store.redis.zscore(index, "a") is None, "a delete removes the run from the index"
        await store.redis.delete(store.meta_key(("t1", "b")))  # as its PEXPIREAT would
        assert [r.message_id for r in await store.list_runs("t1", RunQuery())] == ["c"]
        assert await store.redis.zscore(index, "b") is None, "an expired run leaves the index when met"
        # A member without meta that is very recent may be a run being created: it stays.
        await store.redis.zadd(index, {"creating": time.time() * 1000})
        assert [r.message_id for r in await store.list_runs("t1", RunQuery())] == ["c"]
        assert await store.redis.zscore(index, "creating") is not None
        await store.redis.zadd(index, {"b": old * 1000})  # an expired run's member nobody listed yet
        assert await store.create_run(record("b", created_at=old + 1000)), "the same id again, after it expired"
        assert await store.redis.zscore(index, "b") == (old + 1000) * 1000, "listed at the new run's time"
        store.index_horizon_s = 60.0
        assert await store.create_run(record("d"))
        assert await store.redis.zscore(index, "c") is None, "members past the horizon are trimmed"
        assert [r.message_id for r in await store.list_runs("t1", RunQuery())] == ["d"], "b and c were trimmed"
    finally:
        await store.close()
