"""Request validation over real HTTP: each rule answers 422 (or 413) naming the field, and nothing runs."""

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


TOOL = {"name": "weather", "description": "w", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASSISTANT_CALL = {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}]}


CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level field", body(max_token=5), "max_token"),
    ("messages missing", {"model": "gpt"}, "messages"),
    ("messages empty", body(messages=[]), "messages"),
    ("messages wrong type", body(messages="hello"), "messages"),
    ("bad role", body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    ("content wrong type", body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    ("unknown block type", body(messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]), "messages.0.content.0"),
    ("max_tokens wrong type", body(max_tokens="ten"), "max_tokens"),
    ("max_tokens zero", body(max_tokens=0), "max_tokens"),
    ("temperature too high", body(temperature=2.5), "temperature"),
    ("temperature negative", body(temperature=-0.1), "temperature"),
    ("top_p above 1", body(top_p=1.5), "top_p"),
    ("top_k negative", body(top_k=-1), "top_k"),
    ("min_p above 1", body(min_p=1.2), "min_p"),
    ("repetition_penalty zero", body(repetition_penalty=0), "repetition_penalty"),
    ("presence_penalty below -2", body(presence_penalty=-2.5), "presence_penalty"),
    ("frequency_penalty above 2", body(frequency_penalty=2.1), "frequency_penalty"),
    ("seed not int", body(seed="abc"), "seed"),
    ("too many stop sequences", body(stop_sequences=[f"s{i}" for i in range(17)]), "stop_sequences"),
    ("empty stop sequence", body(stop_sequences=[""]), "stop_sequences.0"),
    ("duplicate tool names", body(tools=[TOOL, TOOL]), "tools"),
    ("tool schema not object", body(tools=[{**TOOL, "input_schema": {"type": "string"}}]), "tools.0.input_schema"),
    ("bad tool name", body(tools=[{**TOOL, "name": "has space"}]), "tools.0.name"),
    ("tool_choice unknown tool", body(tools=[TOOL], tool_choice={"type": "tool", "name": "nope"}), "tool_choice.name"),
    ("tool_choice tool without name", body(tools=[TOOL], tool_choice={"type": "tool"}), "tool_choice"),
    ("tool_choice any without tools", body(tool_choice={"type": "any"}), "tool_choice"),
    ("tool_choice bad type", body(tools=[TOOL], tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (
        "tool_result id matches nothing",
        body(messages=[*USER, ASSISTANT_CALL, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_2", "content": "sunny"}]}]),
        "messages.2.content.0.tool_use_id",
    ),
    (
        "tool_result not after its call",
        body(
            messages=[
                *USER,
                ASSISTANT_CALL,
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "again"}]},
            ]
        ),
        "messages.4.content.0.tool_use_id",
    ),
    ("duplicate tool_use ids", body(messages=[*USER, {"role": "assistant", "content": [ASSISTANT_CALL["content"][0], ASSISTANT_CALL["content"][0]]}]), "messages.1.content.1.id"),
    ("tool_use in a user message", body(messages=[{"role": "user", "content": ASSISTANT_CALL["content"]}]), "messages.0.content.0"),
    ("thinking bad effort", body(thinking={"enabled": True, "effort": "extreme"}), "thinking"),
    ("thinking budget zero", body(thinking={"type": "enabled", "budget_tokens": 0}), "thinking"),
    ("structured output with tools", body(tools=[TOOL], output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}), "output_config.format"),
    ("metadata values must be strings", body(metadata={"user_id": 5}), "metadata.user_id"),
    ("priority not int", body(priority="high"), "priority"),
    ("mcp server without url", body(mcp_servers=[{"name": "x"}]), "mcp_servers.0.url"),
    ("image without source", body(messages=[{"role": "user", "content": [{"type": "image"}]}]), "messages.0.content.0.image.source"),
]


@pytest.mark.parametrize(("name", "payload", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_request_names_the_field(http: httpx.Client, fake: FakeUpstream, name: str, payload: dict[str, Any], field: str) -> None:
    assert_invalid(http.post("/v1/messages", json=payload), field)
    assert fake.requests == [], "an invalid request must not reach the upstream"


def test_unknown_model_lists_available(http: httpx.Client) -> None:
    err = assert_invalid(http.post("/v1/messages", json=body(model="gpt-9000")), "model")
    message = err["error"]["message"]
    for name in ("gpt", "gpt-alias", "claude", "local"):
        assert name in message


def test_body_not_json(http: httpx.Client) -> None:
    assert_invalid(http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}), "body")
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


@pytest.mark.parametrize(
    "system",
    [
        "be brief",
        ["be brief", "be kind"],
        {"text": "be brief"},
        [{"text": "be brief"}, {"text": "be kind", "citations": []}],
        [{"type": "text", "text": "be brief"}],
    ],
    ids=["str", "list-str", "object", "list-object", "anthropic-blocks"],
)
def test_system_forms_are_normalised(http: httpx.Client, fake: FakeUpstream, system: Any) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    resp = http.post("/v1/messages", json=body(system=system))
    assert resp.status_code == 200, resp.text
    sent = fake.requests[-1].body["messages"]
    assert sent[0]["role"] == "system"
    assert sent[0]["content"].startswith("be brief")
    if isinstance(system, list) and len(system) == 2:
        assert "be kind" in sent[0]["content"]


def test_system_null_and_system_role_message_folded(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    resp = http.post("/v1/messages", json=body(system=None, messages=[{"role": "system", "content": "rules"}, *USER]))
    assert resp.status_code == 200, resp.text
    sent = fake.requests[-1].body["messages"]
    assert sent == [{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}]


def test_only_system_messages_is_invalid(http: httpx.Client) -> None:
    assert_invalid(http.post("/v1/messages", json=body(messages=[{"role": "system", "content": "rules"}])), "messages")


def test_valid_tool_round_trip_is_accepted(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["It is sunny"])])
    msgs = [*USER, ASSISTANT_CALL, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]}]
    resp = http.post("/v1/messages", json=body(messages=msgs, tools=[TOOL], tool_choice={"type": "tool", "name": "weather"}))
    assert resp.status_code == 200, resp.text
    sent = fake.requests[-1].body
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "weather"}}


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
