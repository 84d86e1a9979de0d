"""context_management over real HTTP: a conversation whose earlier tool results exceed the model's configured
context window is trimmed before it reaches the (fake) upstream, and stream_start.metadata says what went.
The dropping rules themselves are checked in-process in tests/test_core_context_window.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import watch
from tests.support.server import ServerProcess, fake_models
from tests.support.sse import parse_sse

PLACEHOLDER = "[tool result removed to fit the context window]"
WINDOW = 1000
FETCH = {"name": "fetch", "description": "Fetch a page.", "input_schema": {"type": "object"}}


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    small = {"retries": 0, "timeout_s": 5, "context_window": WINDOW}
    models = [
        *fake_models(fake),
        {"name": "small-gpt", "provider": "openai", "base_url": fake.base_url, "model": "small-gpt-up", **small},
        {"name": "small-claude", "provider": "anthropic", "base_url": fake.url, "model": "small-claude-up", **small},
    ]
    server = ServerProcess(tmp_path_factory.mktemp("ctx"), {"store": "memory", "models": models}, name="ctx").start()
    yield server
    server.stop()


def history(rounds: int = 3) -> list[dict[str, Any]]:
    """A client-tool conversation: each result ~500 estimated tokens, so three exceed a 1,000-token window."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Summarise the three pages."}]
    for n in range(1, rounds + 1):
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{n}", "name": "fetch", "input": {"n": n}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{n}", "content": f"RESULT-{n} " + "y" * 1500}],
            },
        ]
    return messages


def stream(c: httpx.Client, model: str, **payload: Any) -> list[dict[str, Any]]:
    body = {"model": model, "max_tokens": 64, "messages": history(), "tools": [FETCH], "stream": True, **payload}
    with c.stream("POST", "/v1/messages", json=body) as resp:
        raw = resp.read()
        assert resp.status_code == 200, raw
    return parse_sse(raw)


def check_report(report: dict[str, Any]) -> None:
    assert report["dropped_tool_results"] == 2 and report["dropped_thinking_blocks"] == 0
    assert report["context_window"] == WINDOW and report["fits"] is True
    assert report["estimated_tokens_before"] > WINDOW >= report["estimated_tokens_after"]


def test_openai_upstream_gets_placeholders_for_the_oldest_results(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("small-gpt-up", Reply(tokens=["Three pages."]))
    with srv.client() as c:
        frames = stream(c, "small-gpt", context_management={"strategy": "drop_oldest"})
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    check_report(frames[0]["data"]["metadata"]["context_management"])
    (sent,) = fake.requests
    tool_messages = [m for m in sent.body["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["t1", "t2", "t3"]  # every call still has its answer
    assert [m["content"] for m in tool_messages][:2] == [PLACEHOLDER, PLACEHOLDER]
    assert tool_messages[2]["content"].startswith("RESULT-3 ")  # the newest result is untouched
    raw = orjson.dumps(sent.body)
    assert b"RESULT-1" not in raw and b"RESULT-2" not in raw
    assert "context_management" not in sent.body  # the gateway handled it; OpenAI has no such field


def test_anthropic_upstream_with_anthropic_edits(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("small-claude-up", Reply(tokens=["Three pages."]))
    edits = {"edits": [{"type": "clear_tool_uses_20250919", "keep": {"type": "tool_uses", "value": 1}}]}
    with srv.client() as c:
        frames = stream(c, "small-claude", context_management=edits)
    check_report(frames[0]["data"]["metadata"]["context_management"])
    (sent,) = fake.requests
    blocks = [b for m in sent.body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    results = [b for b in blocks if b["type"] == "tool_result"]
    assert [(b["tool_use_id"], b["content"]) for b in results[:2]] == [("t1", PLACEHOLDER), ("t2", PLACEHOLDER)]
    assert results[2]["content"].startswith("RESULT-3 ")
    assert sent.body["context_management"] == edits  # passed on as sent: Anthropic applies its own edits too
    assert (
        sent.headers.get("anthropic-beta") == "context-management-2025-06-27"
    )  # without it Anthropic refuses the field


def test_without_context_management_the_request_goes_unchanged(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("small-gpt-up", Reply(tokens=["ok"]))
    with srv.client() as c:
        frames = stream(c, "small-gpt")
    assert "context_management" not in frames[0]["data"]["metadata"]
    (sent,) = fake.requests
    assert PLACEHOLDER.encode() not in orjson.dumps(sent.body)
    assert [m["content"][:9] for m in sent.body["messages"] if m["role"] == "tool"] == [
        "RESULT-1 ",
        "RESULT-2 ",
        "RESULT-3 ",
    ]


def test_a_background_run_stores_the_report(srv: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("small-gpt-up", Reply(tokens=["ok"]))
    body = {"model": "small-gpt", "max_tokens": 64, "messages": history(), "tools": [FETCH]}
    with srv.client() as c:
        resp = c.post("/v1/messages/async", json={**body, "context_management": {"strategy": "drop_oldest"}})
        assert resp.status_code == 200, resp.text
        frames = watch(c, resp.json()["message_id"])
    assert frames[0]["event"] == "stream_start"
    check_report(frames[0]["data"]["metadata"]["context_management"])
    assert b"RESULT-1" not in orjson.dumps(fake.requests[0].body)


def test_an_unknown_shape_is_a_422_before_anything_runs(srv: ServerProcess, fake: FakeUpstream) -> None:
    with srv.client() as c:
        resp = c.post(
            "/v1/messages",
            json={"model": "small-gpt", "messages": history(), "context_management": {"strategy": "summarise"}},
        )
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and 'needs "edits"' in error["message"]
    assert error["details"][0]["field"] == "context_management"
    assert fake.requests == []
