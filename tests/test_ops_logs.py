"""Logs as an operator reads them: JSON lines, one access line per request, the run's context on every run line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from backstream.auth import new_api_key
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER, start, wait_status
from tests.support.server import SECRETS, ServerProcess
from tests.support.sse import parse_sse

KEY, DIGEST = new_api_key()
SECRETS.add(KEY)
AUTH = {"authorization": f"Bearer {KEY}", "x-tenant": "acme"}
STABLE = ("ts", "level", "logger", "msg")


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = [
        {
            "name": "gpt",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "l-gpt-up",
            "retries": 1,
            "backoff_s": 0.01,
            "timeout_s": 5,
        },
    ]
    config = {
        "store": "memory",
        "models": models,
        "log": {"format": "json"},
        "auth": {"api_keys": [{"name": "ops-ci", "sha256": DIGEST, "tenants": ["acme", "globex"]}]},
    }
    server = ServerProcess(tmp_path_factory.mktemp("ops-logs"), config, name="ops-logs")
    yield server.start()
    server.stop()


@pytest.fixture()
def c(srv: ServerProcess) -> Iterator[httpx.Client]:
    with srv.client(headers=AUTH) as client:
        yield client


def lines(srv: ServerProcess) -> list[dict[str, Any]]:
    """Every line of the server's output, parsed: all of them must be JSON objects with the stable keys."""
    out = []
    for raw in srv.log_path.read_text().splitlines():
        line = json.loads(raw)  # fails the test on any line that is not JSON
        assert all(k in line for k in STABLE), line
        out.append(line)
    return out


def wait_line(srv: ServerProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any]:
    """The first log line that matches (the access line is written once the response has ended)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in lines(srv) if match(line)]
        if found or time.monotonic() > deadline:
            assert found, "no matching log line"
            return found[0]
        time.sleep(0.02)


def access_line(srv: ServerProcess, request_id: str) -> dict[str, Any]:
    return wait_line(srv, lambda line: line["logger"] == "backstream.access" and line.get("request_id") == request_id)


def test_start_up_lines_are_json_and_name_what_is_served(srv: ServerProcess) -> None:
    msgs = [line["msg"] for line in lines(srv) if line["logger"] == "backstream.serve"]
    assert any(m.startswith("Backstream ") and f":{srv.port}" in m for m in msgs), msgs
    assert any(m.startswith("store: memory") for m in msgs), msgs
    assert any(m.startswith("model gpt") and "openai l-gpt-up" in m for m in msgs), msgs
    assert any(m.startswith("auth: required") for m in msgs), msgs


def test_one_access_line_per_request_without_credentials(
    srv: ServerProcess, c: httpx.Client, fake: FakeUpstream
) -> None:
    fake.script("l-gpt-up", [Reply(tokens=["a", "b"])])
    resp = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 8, "messages": USER})
    assert resp.status_code == 200, resp.text
    rid = resp.headers["x-request-id"]
    line = access_line(srv, rid)
    assert line["method"] == "POST" and line["path"] == "/v1/messages" and line["status"] == 200
    assert line["tenant"] == "acme" and line["key"] == "key:ops-ci" and line["duration_ms"] >= 0
    assert line["message_id"] == resp.json()["id"] and line["model"] == "gpt"
    assert sum(1 for x in lines(srv) if x["logger"] == "backstream.access" and x.get("request_id") == rid) == 1
    unauth = httpx.get(srv.url + "/v1/models", headers={"authorization": "Bearer bsk_wrong"})
    assert unauth.status_code == 401
    assert access_line(srv, unauth.headers["x-request-id"])["status"] == 401
    assert "bsk_wrong" not in srv.log_path.read_text()


def test_sse_stream_logged_when_it_ends_with_its_duration(
    srv: ServerProcess, c: httpx.Client, fake: FakeUpstream
) -> None:
    fake.script("l-gpt-up", [Reply(tokens=["a", "b", "c", "d", "e"], delay=0.06)])
    with c.stream(
        "POST", "/v1/messages", json={"model": "gpt", "max_tokens": 8, "messages": USER, "stream": True}
    ) as resp:
        frames = parse_sse(resp.read())
    assert frames[-1]["event"] == "stream_end"
    line = access_line(srv, resp.headers["x-request-id"])
    assert line["status"] == 200 and line["duration_ms"] >= 200, line  # 4 pauses of 60 ms


def test_run_lines_carry_message_request_tenant_and_model(
    srv: ServerProcess, c: httpx.Client, fake: FakeUpstream
) -> None:
    fake.script("l-gpt-up", [Reply(status=500), Reply(tokens=["ok"])])  # the first attempt fails: a warning line
    resp = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 8, "messages": USER})
    assert resp.status_code == 200, resp.text
    rid, mid = resp.headers["x-request-id"], resp.json()["id"]
    warning = wait_line(srv, lambda line: line["logger"] == "backstream.engine" and line.get("message_id") == mid)
    assert warning["level"] == "warning" and "attempt 1 failed" in warning["msg"]
    assert (warning["request_id"], warning["tenant"], warning["model"]) == (rid, "acme", "gpt")

    fake.script("l-gpt-up", [Reply()])
    submitted = c.post("/v1/messages/async", json={"model": "gpt", "max_tokens": 8, "messages": USER})
    assert submitted.status_code == 200, submitted.text
    bg = submitted.json()["message_id"]
    wait_status(c, bg, {"completed"})
    ended = wait_line(srv, lambda line: line["logger"] == "backstream.executor" and line.get("message_id") == bg)
    assert (ended["request_id"], ended["tenant"], ended["model"]) == (submitted.headers["x-request-id"], "acme", "gpt")


def test_user_strings_cannot_start_a_line(srv: ServerProcess, c: httpx.Client) -> None:
    resp = c.get('/v1/nothing%0a{"level":"error","msg":"forged"}%0d%e2%80%a8x')
    assert resp.status_code == 404
    line = access_line(srv, resp.headers["x-request-id"])
    assert line["path"] == '/v1/nothing\n{"level":"error","msg":"forged"}\r\u2028x'
    assert not any(line["msg"] == "forged" for line in lines(srv)), "every line is a whole record"
    mid = start(c, model="gpt")  # context does not leak from one request into the next
    status = c.get(f"/v1/messages/async/{mid}/status")
    assert "message_id" not in access_line(srv, status.headers["x-request-id"])
