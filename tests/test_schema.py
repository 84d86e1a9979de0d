"""Request validation over real HTTP: a refusal answers 422 (or 413) naming the field, and nothing runs.

One case per kind goes over HTTP here; the rules themselves are checked in-process in
tests/test_core_validation.py (payload shapes in tests/test_core_providers.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER


def body(**over: Any) -> dict[str, Any]:
    return {"model": "gpt", "max_tokens": 8, "messages": USER, **over}


def assert_invalid(resp: httpx.Response, field: str, status: int = 422) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert set(err) == {"error", "request_id"}
    assert err["request_id"] == resp.headers["x-request-id"]
    assert err["error"]["type"] == "invalid_request_error"
    fields = [d["field"] for d in err["error"].get("details", [])]
    assert any(f == field or f.startswith(field + ".") for f in fields), (field, fields)
    return err


ASSISTANT_CALL = {
    "role": "assistant",
    "content": [{"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}],
}


# One case per kind of refusal, end to end (status, shape, nothing sent upstream); every rule is
# checked in-process in tests/test_core_validation.py.
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level field", body(max_token=5), "max_token"),
    ("temperature too high", body(temperature=2.5), "temperature"),
    (
        "unknown block type",
        body(messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
        "messages.0.content.0",
    ),
    (
        "tool_result id matches nothing",
        body(
            messages=[
                *USER,
                ASSISTANT_CALL,
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_2", "content": "sunny"}]},
            ]
        ),
        "messages.2.content.0.tool_use_id",
    ),
    ("mcp server without url", body(mcp_servers=[{"name": "x"}]), "mcp_servers.0.url"),
]


@pytest.mark.parametrize(("name", "payload", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_request_names_the_field(
    http: httpx.Client, fake: FakeUpstream, name: str, payload: dict[str, Any], field: str
) -> None:
    assert_invalid(http.post("/v1/messages", json=payload), field)
    assert fake.requests == [], "an invalid request must not reach the upstream"


def test_unknown_model_lists_available(http: httpx.Client) -> None:
    err = assert_invalid(http.post("/v1/messages", json=body(model="gpt-9000")), "model")
    message = err["error"]["message"]
    for name in ("gpt", "gpt-alias", "claude", "local"):
        assert name in message


def test_body_not_json(http: httpx.Client) -> None:
    assert_invalid(
        http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}), "body"
    )
    assert_invalid(http.post("/v1/messages", json=[1, 2]), "body")
    assert_invalid(http.post("/v1/messages", content=b""), "body")


def test_body_too_large_is_413(http: httpx.Client, fake: FakeUpstream) -> None:
    big = "x" * (10 * 1024 * 1024 + 10)
    resp = http.post("/v1/messages", json=body(messages=[{"role": "user", "content": big}]))
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"
    assert fake.requests == []


def test_body_too_large_without_content_length_is_413(http: httpx.Client) -> None:
    def chunks():  # a generator body is sent chunked, with no Content-Length
        for _ in range(11):
            yield b"x" * (1024 * 1024)

    resp = http.post("/v1/messages", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_every_documented_field_is_accepted(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("claude-up", [Reply(tokens=["ok"])])
    resp = http.post(
        "/v1/messages",
        json=body(
            model="claude",
            system="s",
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            seed=7,
            stop_sequences=["END"],
            tool_context=[{"type": "text", "text": "ctx"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
            priority=3,
            metadata={"user_id": "u1"},
            correlation_id="corr-1",
            service_tier="auto",
            inference_geo="eu",
            container="c1",
            cache_control={"type": "ephemeral"},
            context_management={"edits": []},
            maximum_loaded_skills=2,
            stream=False,
        ),
    )
    assert resp.status_code == 200, resp.text
    sent = fake.requests[-1].body
    assert sent["top_k"] == 40 and sent["stop_sequences"] == ["END"] and sent["metadata"] == {"user_id": "u1"}
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["service_tier"] == "auto" and sent["container"] == "c1"
    warnings = resp.json()["warnings"]
    for dropped in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        assert any(dropped in w for w in warnings), (dropped, warnings)
