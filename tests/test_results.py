"""`GET /v1/messages/async/{id}/result`: the stored log folded into one message, plus the status.

Over real HTTP against real servers (memory and SQLite stores) with the fake upstream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER, check_run, slow, start, wait_events, wait_status
from tests.support.server import SECRETS, ServerProcess, fake_models

KEY_ACME = "bsk_test_results_acme_0123456789abcdef"
KEY_GLOBEX = "bsk_test_results_globex_0123456789abcd"
SECRETS.update({KEY_ACME, KEY_GLOBEX})


def result(c: httpx.Client, mid: str, **kw: Any) -> dict[str, Any]:
    resp = c.get(f"/v1/messages/async/{mid}/result", **kw)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def sqlite_srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("results"),
        {"store": "sqlite", "models": fake_models(fake), "keepalive_s": 1},
        name="results-sqlite",
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["memory", "sqlite"])
def c(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    srv: ServerProcess = request.getfixturevalue("server" if request.param == "memory" else "sqlite_srv")
    with srv.client() as client:
        yield client


def test_completed_run_is_the_non_streamed_message_plus_status(c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(tokens=["Hello", ",", " world", "!"], usage=(12, 4)))
    mid = start(c)
    frames = check_run(c, mid)
    body = result(c, mid)
    sync = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 64, "messages": USER}).json()
    assert body["status"] == "completed"
    assert body["id"] == mid and body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "Hello, world!"}] == sync["content"]
    assert body["finish_reason"] == "Stop" == sync["finish_reason"]
    assert body["usage"] == sync["usage"] == frames[-1]["data"]["usage"]
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 4
    assert (body["model"], body["provider"]) == (sync["model"], sync["provider"]) == ("gpt", "openai")
    assert "error" not in body


def test_cancelled_run_keeps_its_text_and_reports_usage(c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(300, 0.02))
    mid = start(c)
    wait_events(c, mid, 12)
    assert c.post(f"/v1/messages/async/{mid}/cancel").status_code == 200
    frames = check_run(c, mid)
    body = result(c, mid)
    streamed = "".join(f["data"]["delta"] for f in frames if f["event"] == "text_delta")
    deltas = sum(f["event"] == "text_delta" for f in frames)
    assert body["status"] == "cancelled" and body["finish_reason"] == "Cancelled"
    assert streamed and body["content"] == [{"type": "text", "text": streamed}], "the text streamed before the cancel"
    assert body["usage"] is not None
    assert isinstance(body["usage"]["prompt_tokens"], int), body["usage"]
    assert body["usage"]["completion_tokens"] == deltas > 0, "tokens so far"


def test_failed_run_has_error_and_usage(c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", Reply(status=400, error_message="bad things"))
    mid = start(c)
    wait_status(c, mid, {"failed"})
    body = result(c, mid)
    assert body["status"] == "failed" and body["finish_reason"] == "Error"
    assert body["error"]["type"] and body["error"]["message"]
    assert body["usage"] is not None
    assert isinstance(body["usage"]["prompt_tokens"], int) and body["usage"]["completion_tokens"] == 0


def test_running_run_returns_what_exists_so_far(c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", slow(400, 0.02))
    mid = start(c)
    wait_events(c, mid, 10)
    first = result(c, mid)
    wait_events(c, mid, first_count(c, mid) + 5)
    later = result(c, mid)
    assert first["status"] == "processing" and first["finish_reason"] is None
    text1, text2 = first["content"][0]["text"], later["content"][0]["text"]
    assert text1.startswith("t0 t1 ") and text2.startswith(text1) and len(text2) > len(text1), "it grows"
    assert first["usage"]["completion_tokens"] >= 5
    c.delete(f"/v1/messages/async/{mid}")


def first_count(c: httpx.Client, mid: str) -> int:
    return c.get(f"/v1/messages/async/{mid}/status").json()["metadata"]["event_count"]


def test_pending_and_unknown(http: httpx.Client) -> None:
    assert http.get("/v1/messages/async/msg_nope/result").json()["error"]["type"]
    assert http.get("/v1/messages/async/msg_nope/result").status_code == 404
    assert http.get("/v1/messages/async/bad%20id/result").status_code == 404


@pytest.fixture(scope="module")
def keyed(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    keys = [
        {"name": "acme", "sha256": hashlib.sha256(KEY_ACME.encode()).hexdigest(), "tenants": ["acme"]},
        {"name": "globex", "sha256": hashlib.sha256(KEY_GLOBEX.encode()).hexdigest(), "tenants": ["globex"]},
    ]
    config = {"store": "memory", "models": fake_models(fake), "auth": {"api_keys": keys}}
    srv = ServerProcess(tmp_path_factory.mktemp("results-keyed"), config, name="results-keyed").start()
    yield srv
    srv.stop()


def test_result_is_tenant_scoped(keyed: ServerProcess, fake: FakeUpstream) -> None:
    acme = {"Authorization": f"Bearer {KEY_ACME}"}
    globex = {"Authorization": f"Bearer {KEY_GLOBEX}"}
    with keyed.client(headers=acme) as c:
        mid = start(c)
        wait_status(c, mid, {"completed"})
        assert result(c, mid)["content"][0]["text"] == "Hello, world!"
    with keyed.client() as c:
        assert c.get(f"/v1/messages/async/{mid}/result").status_code == 401
        other = c.get(f"/v1/messages/async/{mid}/result", headers=globex)
        assert other.status_code == 404, "another tenant's run does not exist"
        assert other.json()["error"]["type"]
