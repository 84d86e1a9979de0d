"""Model concurrency: remote models have no hidden cap; a configured max_concurrency holds."""

from __future__ import annotations

import asyncio

import httpx

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER
from tests.support.server import ServerProcess

CLIENTS = 40  # more than the old silent default of 16


async def stream_many(url: str, n: int, model: str) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=n)) as c:

        async def one() -> int:
            body = {"model": model, "max_tokens": 8, "stream": True, "messages": USER}
            async with c.stream("POST", "/v1/messages", json=body) as resp:
                await resp.aread()
                return resp.status_code

        return await asyncio.gather(*(one() for _ in range(n)))


def test_remote_model_without_max_concurrency_is_not_capped(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["a", "b"], ttft=1.0)] * CLIENTS)  # all in flight together
    assert asyncio.run(stream_many(server.url, CLIENTS, "gpt")) == [200] * CLIENTS
    assert fake.peak_open_streams == CLIENTS, "every request reached the upstream at once"
    with server.client() as c:
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert listed["gpt"]["max_concurrency"] is None and listed["local"]["max_concurrency"] == 1


def test_configured_max_concurrency_still_holds(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-four-up", [Reply(tokens=["a"], ttft=0.3)] * 12)
    assert asyncio.run(stream_many(server.url, 12, "gpt-four")) == [200] * 12
    assert fake.peak_open_streams == 4
