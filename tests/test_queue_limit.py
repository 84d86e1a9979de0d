"""Queue limits under concurrent starts, on every store: check-and-insert is one atomic step."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER
from tests.support.server import REDIS_URL, ServerProcess, fake_models

STARTS = 200
CAPACITY = 1  # gpt-one: one run executes, the others wait in the queue


async def start_many(url: str, n: int) -> list[tuple[str, int, dict[str, Any]]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:

        async def one(i: int) -> tuple[str, int, dict[str, Any]]:
            mid = f"q{i}-{uuid.uuid4().hex[:6]}"
            body = {"model": "gpt-one", "max_tokens": 4, "messages": USER}
            resp = await c.post("/v1/messages/async", params={"message_id": mid}, json=body)
            return mid, resp.status_code, resp.json()

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.fixture(autouse=True)
def _redis_db_for_redis_store(request: pytest.FixtureRequest, store: str) -> None:
    """The `redis` cases use the suite's Redis database; the others run without Redis."""
    if store == "redis":
        request.getfixturevalue("redis_db")


def server_for(store: str, fake: FakeUpstream, tmp: Path, **extra: Any) -> ServerProcess:
    config: dict[str, Any] = {"store": store, "models": fake_models(fake), **extra}
    if store == "redis":
        config["redis"] = {"url": REDIS_URL, "key_prefix": f"bsq-{uuid.uuid4().hex[:8]}"}
    return ServerProcess(tmp, config, name=f"queue-{store}")


def accepted_and_clean(srv: ServerProcess, results: list[tuple[str, int, dict[str, Any]]]) -> list[str]:
    accepted = [mid for mid, code, _ in results if code == 200]
    refused = [(mid, body) for mid, code, body in results if code != 200]
    assert {code for _, code, _ in results} <= {200, 429}
    with srv.client() as c:
        for mid, body in refused:
            assert body["error"]["type"] == "rate_limit_error"
            assert c.get(f"/v1/messages/async/{mid}/status").status_code == 404, "a refused start leaves nothing behind"
    return accepted


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
def test_global_queue_limit_holds_under_concurrent_starts(store: str, fake: FakeUpstream, tmp_path: Path) -> None:
    limit = 5
    fake.script("gpt-one-up", [Reply(tokens=["x"], ttft=20.0)] * 10)  # the first run holds the only slot
    srv = server_for(store, fake, tmp_path, runs={"queue_limit": limit}).start()
    try:
        accepted = accepted_and_clean(srv, asyncio.run(start_many(srv.url, STARTS)))
        assert limit <= len(accepted) <= limit + CAPACITY, len(accepted)
    finally:
        srv.stop()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_tenant_queue_limit_holds_under_concurrent_starts(store: str, fake: FakeUpstream, tmp_path: Path) -> None:
    limit = 3
    fake.script("gpt-one-up", [Reply(tokens=["x"], ttft=20.0)] * 10)
    srv = server_for(store, fake, tmp_path, limits={"tenant_default": {"max_queued_runs": limit}}).start()
    try:
        accepted = accepted_and_clean(srv, asyncio.run(start_many(srv.url, STARTS)))
        assert len(accepted) == limit
    finally:
        srv.stop()
