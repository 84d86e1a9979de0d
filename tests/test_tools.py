"""Tools and agent steps over real HTTP: MCP servers (real, via the mcp SDK), SSRF guard, client tools,
structured output and stop sequences. Payload mappings (tool_choice …) and the run loop's rules are
checked in-process in tests/test_core_providers.py and tests/test_core_run_loop.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.mcp_server import McpHttpServer
from tests.support.server import SECRETS, ServerProcess, fake_models
from tests.support.sse import event_types as kinds
from tests.support.sse import parse_sse

USER = [{"role": "user", "content": "What is 2 + 3?"}]
MCP_TOKEN = "mcp-bearer-secret-for-tests-only-77"
SECRETS.add(MCP_TOKEN)


@pytest.fixture(scope="module")
def mcp() -> Iterator[McpHttpServer]:
    server = McpHttpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agent(fake: FakeUpstream, mcp: McpHttpServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "egress": {"allow_hosts": [f"127.0.0.1:{mcp.http_port}", f"127.0.0.1:{mcp.sse_port}"]},
        "runs": {"max_steps": 3, "tool_timeout_s": 1.0},
    }
    srv = ServerProcess(tmp_path_factory.mktemp("agent"), config, name="agent").start()
    yield srv
    srv.stop()


def mcp_entry(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "calc", "url": url, **extra}


def call(name: str, args: dict[str, Any], call_id: str = "call_1") -> ToolCall:
    raw = orjson.dumps(args).decode()
    return ToolCall(id=call_id, name=name, arguments=[raw[: len(raw) // 2], raw[len(raw) // 2 :]])


def run_stream(c: httpx.Client, **payload: Any) -> list[dict[str, Any]]:
    with c.stream(
        "POST", "/v1/messages", json={"model": "gpt", "max_tokens": 64, "messages": USER, **payload, "stream": True}
    ) as resp:
        body = resp.read()
        assert resp.status_code == 200, body
    return parse_sse(body)


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
def test_mcp_tool_steps(agent: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer, transport: str) -> None:
    fake.script(
        "gpt-up", [Reply(tokens=[], tool_calls=[call("add", {"a": 2, "b": 3})]), Reply(tokens=["The answer ", "is 5."])]
    )
    url = mcp.url if transport == "streamable_http" else mcp.sse_url
    with agent.client() as c:
        frames = run_stream(c, mcp_servers=[mcp_entry(url)])
    assert kinds(frames) == [
        "stream_start",
        "step_start",
        "tool_call_start",
        "tool_call_delta",
        "tool_call_delta",
        "tool_call_complete",
        "step_finish",
        "tool_result",
        "step_start",
        "text_start",
        "text_delta",
        "text_delta",
        "text_complete",
        "step_finish",
        "stream_end",
    ]
    result = frames[7]["data"]
    assert result["tool_call_id"] == "call_1" and result["content"] == "5" and result["is_error"] is False
    assert frames[6]["data"]["finish_reason"] == "ToolUse" and frames[6]["data"]["step"] == 1
    assert frames[8]["data"]["step"] == 2
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    first, second = fake.requests[-2].body, fake.requests[-1].body
    assert sorted(t["function"]["name"] for t in first["tools"]) == ["add", "fail", "lookup", "slow"]
    lookup = next(t for t in first["tools"] if t["function"]["name"] == "lookup")
    assert "tool_context" not in lookup["function"]["parameters"]["properties"], "the gateway fills tool_context itself"
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}


def test_allowed_tools_and_errors_reach_the_model(agent: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer) -> None:
    calls = [call("fail", {"reason": "on purpose"}, "c1"), call("slow", {"seconds": 5}, "c2")]
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=calls), Reply(tokens=["sorry"])])
    conf = {"enabled": True, "allowed_tools": ["fail", "slow"]}
    started = time.monotonic()
    with agent.client() as c:
        frames = run_stream(c, mcp_servers=[mcp_entry(mcp.url, tool_configuration=conf)])
    assert time.monotonic() - started < 4, "the slow tool timed out after tool_timeout_s (1 s)"
    offered = sorted(t["function"]["name"] for t in fake.requests[-2].body["tools"])
    assert offered == ["fail", "slow"], "allowed_tools hides the others"
    results = [f["data"] for f in frames if f["event"] == "tool_result"]
    assert [r["is_error"] for r in results] == [True, True]
    assert "fail" in results[0]["content"] and "timed out" in results[1]["content"]
    assert frames[-1]["data"]["finish_reason"] == "Stop", "tool failures do not crash the run"
    sent = fake.requests[-1].body["messages"]
    assert sent[-2]["role"] == "tool" and sent[-2]["content"].startswith("Error:")


def test_step_limit_ends_a_looping_model(agent: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("add", {"a": 1, "b": 1})])])
    with agent.client() as c:
        frames = run_stream(c, mcp_servers=[mcp_entry(mcp.url)])
    assert kinds(frames).count("step_start") == 3 and len(fake.requests) == 3
    end = frames[-1]["data"]
    assert end["finish_reason"] == "Error" and end["error"]["type"] == "step_limit"


def test_token_goes_to_its_mcp_server_only_and_tool_context_is_passed(
    agent: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer
) -> None:
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("lookup", {"query": "plan"})]), Reply(tokens=["ok"])])
    mcp.authorizations.clear()
    with agent.client() as c:
        mid = c.post(
            "/v1/messages/async",
            json={
                "model": "gpt",
                "messages": USER,
                "mcp_servers": [mcp_entry(mcp.url, authorization_token=MCP_TOKEN)],
                "tool_context": [{"doc": "q3-plan"}],
            },
        ).json()["message_id"]
        with c.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
            raw = resp.read()
        status = c.get(f"/v1/messages/async/{mid}/status").text
    frames = parse_sse(raw)
    result = next(f["data"] for f in frames if f["event"] == "tool_result")
    assert result["content"] == "plan: [{'doc': 'q3-plan'}]"
    assert mcp.authorizations and set(mcp.authorizations) == {f"Bearer {MCP_TOKEN}"}
    assert all(
        MCP_TOKEN not in str(r.headers) and MCP_TOKEN not in orjson.dumps(r.body).decode() for r in fake.requests
    )
    assert MCP_TOKEN not in raw.decode() and MCP_TOKEN not in status


def test_unreachable_mcp_server_fails_the_run_clearly(
    agent: ServerProcess, fake: FakeUpstream, mcp: McpHttpServer
) -> None:
    with agent.client() as c:
        resp = c.post(
            "/v1/messages",
            json={
                "model": "gpt",
                "messages": USER,
                "mcp_servers": [mcp_entry(f"http://127.0.0.1:{mcp.http_port}/nothing-here")],
            },
        )
    assert resp.status_code == 502
    assert "calc" in resp.json()["error"]["message"]
    assert fake.requests == []


# One address end to end; the others are checked in-process in tests/test_core_validation.py.
@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data"])
def test_ssrf_guard_refuses_private_addresses(http: httpx.Client, fake: FakeUpstream, url: str) -> None:
    started = time.monotonic()
    resp = http.post("/v1/messages", json={"model": "gpt", "messages": USER, "mcp_servers": [mcp_entry(url)]})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["field"] == "mcp_servers.0.url"
    assert time.monotonic() - started < 2, "refused without trying to connect"
    assert fake.requests == []


def test_ssrf_guard_applies_to_background_runs(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/messages/async",
        json={"model": "gpt", "messages": USER, "mcp_servers": [mcp_entry("http://127.0.0.1:9/mcp")]},
    )
    assert resp.status_code == 422


TOOL = {
    "name": "weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_client_tool_round_trip(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    upstream = {"gpt": "gpt-up", "claude": "claude-up"}[model]
    fake.script(
        upstream,
        [
            Reply(tokens=["Let me check."], tool_calls=[call("weather", {"city": "Paris"}, "toolu_9")]),
            Reply(tokens=["Sunny in Paris."]),
        ],
    )
    first = http.post("/v1/messages", json={"model": model, "max_tokens": 64, "messages": USER, "tools": [TOOL]}).json()
    assert first["finish_reason"] == "ToolUse"
    assert first["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_9", "name": "weather", "input": {"city": "Paris"}},
    ]
    messages = [
        *USER,
        {"role": "assistant", "content": first["content"]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny, 24C"}]},
    ]
    second = http.post(
        "/v1/messages", json={"model": model, "max_tokens": 64, "messages": messages, "tools": [TOOL]}
    ).json()
    assert second["content"] == [{"type": "text", "text": "Sunny in Paris."}] and second["finish_reason"] == "Stop"
    sent = fake.requests[-1].body["messages"]
    if model == "gpt":
        assert sent[-2]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city":"Paris"}'}
        assert sent[-1] == {"role": "tool", "tool_call_id": "toolu_9", "content": "sunny, 24C"}
    else:
        assert sent[-2]["content"][1] == {
            "type": "tool_use",
            "id": "toolu_9",
            "name": "weather",
            "input": {"city": "Paris"},
        }
        assert sent[-1]["content"][0]["type"] == "tool_result" and sent[-1]["content"][0]["tool_use_id"] == "toolu_9"


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_structured_output_valid_and_invalid(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    upstream = {"gpt": "gpt-up", "claude": "claude-up"}[model]
    fake.script(
        upstream,
        [
            Reply(tokens=['{"name": "Ada",', ' "age": 36}']),
            Reply(tokens=['{"name": "Ada"}']),
            Reply(tokens=["not json"]),
        ],
    )
    fmt = {"format": {"type": "json_schema", "schema": SCHEMA}}
    ok = http.post(
        "/v1/messages", json={"model": model, "max_tokens": 64, "messages": USER, "output_config": fmt}
    ).json()
    assert ok["finish_reason"] == "Stop" and orjson.loads(ok["content"][0]["text"]) == {"name": "Ada", "age": 36}
    if model == "gpt":
        assert fake.requests[-1].body["response_format"]["json_schema"]["schema"] == SCHEMA
    else:
        assert fake.requests[-1].body["output_config"]["format"]["schema"] == SCHEMA
    missing = http.post(
        "/v1/messages",
        json={
            "model": model,
            "max_tokens": 64,
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        },
    ).json()
    assert missing["finish_reason"] == "Error" and missing["error"]["type"] == "invalid_output"
    assert "age" in missing["error"]["message"]
    garbage = http.post(
        "/v1/messages", json={"model": model, "max_tokens": 64, "messages": USER, "output_config": fmt}
    ).json()
    assert garbage["finish_reason"] == "Error" and "not valid JSON" in garbage["error"]["message"]


def test_local_model_structured_output_validates(http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    resp = http.post(
        "/v1/messages",
        json={
            "model": "local",
            "max_tokens": 48,
            "messages": [{"role": "user", "content": "Name a city as JSON."}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        },
    )
    msg = resp.json()
    assert resp.status_code == 200 and msg["finish_reason"] == "Stop", msg
    assert isinstance(orjson.loads(msg["content"][0]["text"])["city"], str)


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_stop_sequence_split_across_chunks(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    upstream = {"gpt": "gpt-up", "claude": "claude-up"}[model]
    fake.script(upstream, [Reply(tokens=["Hello ", "wor", "ld EN", "D and more", " text"] + ["x"] * 50, delay=0.02)])
    with http.stream(
        "POST",
        "/v1/messages",
        json={"model": model, "max_tokens": 64, "messages": USER, "stop_sequences": ["END"], "stream": True},
    ) as resp:
        frames = parse_sse(resp.read())
    text = next(f["data"]["text"] for f in frames if f["event"] == "text_complete")
    assert text == "Hello world "
    assert "".join(f["data"]["delta"] for f in frames if f["event"] == "text_delta") == "Hello world "
    assert frames[-1]["data"]["finish_reason"] == "StopSequence"
    fake.wait_for_client_close(fake.requests[-1], timeout=2)  # the gateway stopped reading and closed the upstream


def test_configured_mcp_server_by_name(fake: FakeUpstream, mcp: McpHttpServer, tmp_path: Any) -> None:
    token = "configured-mcp-token-from-env-31"
    SECRETS.add(token)
    config = {
        "store": "memory",
        "models": fake_models(fake),
        # no egress allow-list entry: configured servers are trusted, request URLs are not
        "mcp_servers": [
            {
                "name": "tools",
                "url": mcp.url,
                "authorization_token_env": "TEST_MCP_TOKEN",
                "allowed_tools": ["add", "lookup"],
            }
        ],
    }
    srv = ServerProcess(tmp_path, config, env={"TEST_MCP_TOKEN": token}, name="mcp-config").start()
    fake.script("gpt-up", [Reply(tokens=[], tool_calls=[call("add", {"a": 20, "b": 22})]), Reply(tokens=["42"])])
    mcp.authorizations.clear()
    try:
        with srv.client() as c:
            frames = run_stream(c, mcp_servers=[{"name": "tools"}])
            assert next(f["data"]["content"] for f in frames if f["event"] == "tool_result") == "42"
            assert sorted(t["function"]["name"] for t in fake.requests[-2].body["tools"]) == ["add", "lookup"]
            assert set(mcp.authorizations) == {f"Bearer {token}"}
            resp = c.post("/v1/messages", json={"model": "gpt", "messages": USER, "mcp_servers": [{"name": "unknown"}]})
            assert resp.status_code == 422 and "tools" in resp.json()["error"]["message"]
            resp = c.post(
                "/v1/messages",
                json={"model": "gpt", "messages": USER, "mcp_servers": [{"name": "direct", "url": mcp.url}]},
            )
            assert resp.status_code == 422, "a request's own URL still meets the egress rules"
    finally:
        srv.stop()
