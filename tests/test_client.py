"""`backstream.Client` and `AsyncClient` against real servers: every method, typed errors, and
the watch that resumes by itself across a kill -9 and restart of a server on SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import backstream
from backstream import AsyncClient, Client
from backstream.client import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    StreamEvent,
)
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.replicas import sqlite_server
from tests.support.runs import USER, check_run, slow
from tests.support.server import SECRETS, ServerProcess, fake_models

KEY = "bsk_test_client_acme_0123456789abcdef01"
KEY_LIMITED = "bsk_test_client_limited_0123456789abcd"
SECRETS.update({KEY, KEY_LIMITED})
BODY: dict[str, Any] = {"model": "gpt", "max_tokens": 64, "messages": USER}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.data["delta"] for e in events if e.type == "text_delta")


def test_import_backstream_does_not_load_the_client() -> None:
    code = "import sys, backstream; print('backstream.client' in sys.modules, 'httpx_sse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert backstream.Client is Client and backstream.AsyncClient is AsyncClient


def test_client_start_watch_status_result_cancel_delete(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["Hello", ",", " world", "!"], usage=(7, 4)))
    with Client(server.url) as c:
        run = c.start(**BODY, message_id="client-basic-1")
        assert (run.message_id, run.status) == ("client-basic-1", "pending")
        events = list(c.watch(run.message_id))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[0].type == "stream_start" and events[-1].type == "stream_end"
        assert text_of(events) == "Hello, world!"
        assert [e.seq for e in c.watch(run.message_id, after=3)] == list(range(4, len(events) + 1))
        assert c.status(run.message_id)["status"] == "completed"
        result = c.result(run.message_id)
        assert result["content"] == [{"type": "text", "text": "Hello, world!"}] and result["status"] == "completed"
        with pytest.raises(ConflictError) as conflict:
            c.cancel(run.message_id)
        assert conflict.value.status_code == 409 and conflict.value.request_id
        c.delete(run.message_id)
        with pytest.raises(NotFoundError):
            c.status(run.message_id)


def test_client_cancel_and_chat(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(300, 0.02))
    with Client(server.url) as c:
        run = c.start(**BODY)
        seen = []
        for event in c.watch(run.message_id):
            seen.append(event)
            if event.type == "text_delta" and len(seen) == 8:
                assert c.cancel(run.message_id)["message_id"] == run.message_id
        assert seen[-1].type == "stream_end" and seen[-1].data["finish_reason"] == "Cancelled"
        fake.script("gpt-up", Reply(tokens=["a", "b", "c"]))
        events = list(c.chat(**BODY))
        assert events[0].type == "stream_start" and events[-1].type == "stream_end" and text_of(events) == "abc"
        assert c.create(**BODY)["content"] == [{"type": "text", "text": "abc"}]


def test_watch_of_a_run_deleted_meanwhile_ends(server: ServerProcess, fake: FakeUpstream) -> None:
    """A delete cancels the run first: the watch ends with its stream_end (Cancelled), or, if the close came
    first, its reconnect finds the run gone and raises NotFoundError; it never keeps reconnecting."""
    fake.script("gpt-up", slow(300, 0.02))
    with Client(server.url, max_reconnect_s=5) as c:
        run = c.start(**BODY)
        seen: list[StreamEvent] = []
        try:
            for event in c.watch(run.message_id):
                seen.append(event)
                if len(seen) == 6:
                    c.delete(run.message_id)
        except NotFoundError:
            assert seen[-1].type != "stream_end"
        else:
            assert seen[-1].type == "stream_end" and seen[-1].data["finish_reason"] == "Cancelled"
        assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
        with pytest.raises(NotFoundError):
            list(c.watch(run.message_id))


async def test_async_client_twin(server: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["x", "y", "z"]))
    async with AsyncClient(server.url) as c:
        run = await c.start(**BODY)
        events = [e async for e in c.watch(run.message_id)]
        assert text_of(events) == "xyz" and [e.seq for e in events] == list(range(1, len(events) + 1))
        assert (await c.status(run.message_id))["status"] == "completed"
        assert (await c.result(run.message_id))["content"][0]["text"] == "xyz"
        assert text_of([e async for e in c.chat(**BODY)]) == "xyz"
        with pytest.raises(ConflictError):
            await c.cancel(run.message_id)
        await c.delete(run.message_id)
        with pytest.raises(NotFoundError):
            await c.result(run.message_id)


# ---------------------------------------------------------------- typed errors


@pytest.fixture(scope="module")
def keyed(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = [
        {"name": "acme", "sha256": sha(KEY), "tenants": ["acme"]},
        {"name": "limited", "sha256": sha(KEY_LIMITED), "tenants": ["lim"], "limits": {"requests_per_minute": 2}},
    ]
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "auth": {"api_keys": keys},
        "limits": {"rate_window_s": 30},
    }
    srv = ServerProcess(tmp_path_factory.mktemp("client-keyed"), config, name="client-keyed").start()
    yield srv
    srv.stop()


def test_typed_errors_carry_the_error_shape(keyed: ServerProcess) -> None:
    with Client(keyed.url) as anonymous, pytest.raises(AuthenticationError) as e401:
        anonymous.status("msg_x")
    assert e401.value.status_code == 401 and e401.value.type and e401.value.message and e401.value.request_id
    assert e401.value.body["error"]["message"] == e401.value.message
    with Client(keyed.url, api_key=KEY) as c:
        with pytest.raises(NotFoundError) as e404:
            c.result("msg_unknown")
        assert e404.value.status_code == 404 and e404.value.request_id
        with pytest.raises(InvalidRequestError) as e422:
            c.start(**BODY, temprature=1)
        assert e422.value.status_code == 422 and "temprature" in str(e422.value.details) + e422.value.message
        with pytest.raises(NotFoundError):
            list(c.watch("msg_unknown"))  # not retried: the run does not exist
    with Client(keyed.url, api_key=KEY, tenant="globex") as other, pytest.raises(PermissionDeniedError):
        other.status("msg_x")
    with Client(keyed.url, api_key=KEY_LIMITED) as limited:
        with pytest.raises(RateLimitError) as e429:
            for _ in range(5):
                limited.create(**BODY)
        assert e429.value.status_code == 429 and e429.value.retry_after and e429.value.retry_after > 0


def test_list_follows_cursor_pages() -> None:
    """The listing endpoint's contract ({data, next_cursor}), on a transport that plays the server."""
    pages = {None: (["a", "b"], "c1"), "c1": (["c"], "c2"), "c2": ([], None)}
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.url.params))
        data, nxt = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json={"data": [{"message_id": m} for m in data], "next_cursor": nxt})

    with Client("http://backstream.test", transport=httpx.MockTransport(handler)) as c:
        ids = [r["message_id"] for r in c.list(status="completed", limit=2)]
    assert ids == ["a", "b", "c"]
    assert seen == [
        {"status": "completed", "limit": "2"},
        {"status": "completed", "limit": "2", "cursor": "c1"},
        {"status": "completed", "limit": "2", "cursor": "c2"},
    ]


# ---------------------------------------------------------------- auto-resume


class ThreadWatch:
    """Client.watch in a thread, collecting its events."""

    def __init__(self, url: str, mid: str) -> None:
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self.five = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, mid), daemon=True)
        self.thread.start()

    def _run(self, url: str, mid: str) -> None:
        try:
            with Client(url, max_reconnect_s=60) as c:
                for event in c.watch(mid):
                    self.events.append(event)
                    if len(self.events) >= 5:
                        self.five.set()
        except BaseException as exc:
            self.error = exc


async def _async_watch(url: str, mid: str, got: list[StreamEvent], first: asyncio.Event) -> None:
    async with AsyncClient(url, max_reconnect_s=60) as c:
        async for event in c.watch(mid):
            got.append(event)
            if len(got) >= 5:
                first.set()


async def test_watch_resumes_across_kill_9_and_restart(fake: FakeUpstream, tmp_path: Path) -> None:
    """Both twins watch a run; the server is killed mid-run and restarted on the same file and port:
    what each watch yielded is the stored log exactly (no gap, no duplicate), ending with its stream_end."""
    fake.script("gpt-one-up", slow(400, 0.02))
    srv = sqlite_server(fake, tmp_path, name="client-resume").start()
    try:
        with srv.client() as h:
            mid = h.post("/v1/messages/async", json={**BODY, "model": "gpt-one"}).json()["message_id"]
        sync_watch = ThreadWatch(srv.url, mid)
        got: list[StreamEvent] = []
        first = asyncio.Event()
        task = asyncio.create_task(_async_watch(srv.url, mid, got, first))
        await asyncio.wait_for(first.wait(), 15)
        assert await asyncio.to_thread(sync_watch.five.wait, 15)
        srv.kill()
        before = len(got)
        await asyncio.sleep(0.5)  # the watchers retry against a dead port meanwhile
        srv.start()
        await asyncio.wait_for(task, 30)
        sync_watch.thread.join(30)
        assert sync_watch.error is None and not sync_watch.thread.is_alive()
        with srv.client() as h:
            frames = check_run(h, mid)
        stored = [(f["id"], f["event"], f["data"]) for f in frames]
        assert before < len(got), "the async watch went on after the restart"
        for events in (got, sync_watch.events):
            assert [(e.seq, e.type, e.data) for e in events] == stored, "the watch is the log, each event once"
        assert frames[-1]["event"] == "stream_end"
    finally:
        srv.stop()
