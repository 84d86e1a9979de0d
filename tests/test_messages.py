"""POST /v1/messages over real HTTP against the fake upstream (both wire formats) and the local model."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream, Fault, Reply, ToolCall
from tests.support.runs import USER
from tests.support.sse import event_types as types
from tests.support.sse import parse_sse

UPSTREAM = {"gpt": "gpt-up", "claude": "claude-up"}
PROVIDER = {"gpt": "openai", "claude": "anthropic"}


def stream(http: httpx.Client, **payload: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
    payload = {"max_tokens": 16, "messages": USER, **payload, "stream": True}
    with http.stream("POST", "/v1/messages", json=payload) as resp:
        raw = resp.read()
    return resp, parse_sse(raw) if resp.status_code == 200 else []


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_stream_event_order_and_contents(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Hel", "lo", " there"], usage=(12, 3))])
    resp, frames = stream(http, model=model, correlation_id="c-42", metadata={"user_id": "u7"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert types(frames) == [
        "stream_start",
        "step_start",
        "text_start",
        "text_delta",
        "text_delta",
        "text_delta",
        "text_complete",
        "step_finish",
        "stream_end",
    ]
    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
    datas = [f["data"] for f in frames]
    ids = [d["id"] for d in datas]
    assert all(i.startswith("evt_") and len(i) == 30 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "event ids are unique and time-ordered"
    assert len({d["message_id"] for d in datas}) == 1
    assert all(isinstance(d["timestamp"], int) and abs(d["timestamp"] - time.time()) < 60 for d in datas)
    start = datas[0]
    assert start["model"] == model and start["provider"] == PROVIDER[model]
    assert start["metadata"]["correlation_id"] == "c-42" and start["metadata"]["metadata"] == {"user_id": "u7"}
    assert [d["delta"] for d in datas[3:6]] == ["Hel", "lo", " there"]
    assert datas[6]["text"] == "Hello there"
    end = datas[-1]
    assert end["finish_reason"] == "Stop"
    assert end["usage"]["prompt_tokens"] == 12 and end["usage"]["completion_tokens"] == 3
    assert datas[-2]["usage"] == end["usage"] and datas[-2]["finish_reason"] == "Stop"


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_folded_message(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["Hi", "!"], usage=(5, 2))])
    resp = http.post("/v1/messages", json={"model": model, "max_tokens": 16, "messages": USER})
    assert resp.status_code == 200, resp.text
    msg = resp.json()
    assert msg["id"].startswith("msg_")
    assert msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == model and msg["provider"] == PROVIDER[model]
    assert msg["content"] == [{"type": "text", "text": "Hi!"}]
    assert msg["finish_reason"] == "Stop"
    assert msg["usage"]["prompt_tokens"] == 5 and msg["usage"]["completion_tokens"] == 2
    assert "citations" in msg


def test_anthropic_cache_usage(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("claude-up", [Reply(tokens=["x"], usage=(100, 1), cache=(30, 60))])
    msg = http.post("/v1/messages", json={"model": "claude", "max_tokens": 4, "messages": USER}).json()
    assert msg["usage"]["cache_write_input_tokens"] == 30
    assert msg["usage"]["cache_read_input_tokens"] == 60


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_reasoning_streams_as_thinking(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(reasoning=["Let me ", "think."], tokens=["42"])])
    _, frames = stream(http, model=model, thinking={"enabled": True, "effort": "low"})
    assert types(frames)[2:8] == [
        "thinking_start",
        "thinking_delta",
        "thinking_delta",
        "thinking_complete",
        "text_start",
        "text_delta",
    ]
    assert frames[5]["data"]["thinking"] == "Let me think."
    sent = fake.requests[-1].body
    if model == "gpt":
        assert sent["reasoning_effort"] == "low"
        assert frames[-1]["data"]["usage"]["thought_tokens"] == 2
    else:
        assert sent["thinking"]["type"] == "enabled"
        assert frames[5]["data"]["signature"], "the thinking signature is kept for the next turn"
        assert frames[-1]["data"]["usage"]["thought_tokens"] == 2


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_tool_call_fragments(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    calls = [ToolCall(id="call_a", name="weather", arguments=['{"ci', 'ty": "Pa', 'ris"}'])]
    fake.script(UPSTREAM[model], [Reply(tokens=["Checking"], tool_calls=calls)])
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    _, frames = stream(http, model=model, tools=[tool])
    t = types(frames)
    i = t.index("tool_call_start")
    assert t[i : i + 5] == [
        "tool_call_start",
        "tool_call_delta",
        "tool_call_delta",
        "tool_call_delta",
        "tool_call_complete",
    ]
    assert frames[i]["data"]["tool_call_id"] == "call_a" and frames[i]["data"]["name"] == "weather"
    assert "".join(f["data"]["delta"] for f in frames[i + 1 : i + 4]) == '{"city": "Paris"}'
    assert frames[i + 4]["data"]["input"] == {"city": "Paris"}
    assert frames[-1]["data"]["finish_reason"] == "ToolUse"
    fake.script(UPSTREAM[model], [Reply(tokens=["Checking"], tool_calls=calls)])
    msg = http.post("/v1/messages", json={"model": model, "max_tokens": 16, "messages": USER, "tools": [tool]}).json()
    assert msg["content"][-1] == {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Paris"}}
    assert msg["finish_reason"] == "ToolUse"


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_429_then_success_is_retried(http: httpx.Client, fake: FakeUpstream, model: str) -> None:
    fake.script(UPSTREAM[model], [Reply(status=429), Reply(tokens=["ok"])])
    msg = http.post("/v1/messages", json={"model": model, "max_tokens": 4, "messages": USER})
    assert msg.status_code == 200, msg.text
    assert msg.json()["content"] == [{"type": "text", "text": "ok"}]
    assert len(fake.requests) == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_500_exhausts_retries_then_502(http: httpx.Client, fake: FakeUpstream, streamed: bool) -> None:
    fake.script("gpt-up", [Reply(status=500)])
    resp = http.post("/v1/messages", json={"model": "gpt", "max_tokens": 4, "messages": USER, "stream": streamed})
    assert resp.status_code == 502
    assert resp.json()["error"]["type"] == "upstream_error"
    assert len(fake.requests) == 3, "one call and two retries"


def test_upstream_400_is_not_retried(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("claude-up", [Reply(status=400)])
    resp = http.post("/v1/messages", json={"model": "claude", "max_tokens": 4, "messages": USER})
    assert resp.status_code == 502
    assert len(fake.requests) == 1


def test_hang_before_first_byte_times_out_504(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-slow-up", [Reply(fault=Fault.HANG)])
    started = time.monotonic()
    resp = http.post("/v1/messages", json={"model": "gpt-slow", "max_tokens": 4, "messages": USER})
    assert resp.status_code == 504
    assert resp.json()["error"]["type"] == "timeout_error"
    assert time.monotonic() - started < 3
    fake.wait_for_client_close(fake.requests[0], timeout=2)


def test_fallback_model_answers_when_primary_fails(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-fb-up", [Reply(status=503)])
    fake.script("claude-up", [Reply(tokens=["from", " claude"])])
    _, frames = stream(http, model="gpt-fb")
    start = frames[0]["data"]
    assert start["model"] == "claude" and start["provider"] == "anthropic"
    assert any("fallback" in w for w in start["metadata"]["warnings"])
    assert frames[-1]["data"]["finish_reason"] == "Stop"
    assert [r.model for r in fake.requests] == ["gpt-fb-up", "claude-up"]


@pytest.mark.parametrize(
    ("model", "fault"),
    [
        ("gpt", Fault.MALFORMED),
        ("gpt", Fault.DROP),
        ("claude", Fault.DROP),
        ("claude", Fault.MALFORMED),
        ("claude", Fault.ERROR_EVENT),
        ("gpt", Fault.ERROR_EVENT),
    ],
)
def test_fault_after_first_token_ends_with_error_event(
    http: httpx.Client, fake: FakeUpstream, model: str, fault: Fault
) -> None:
    fake.script(UPSTREAM[model], [Reply(tokens=["a", "b", "c", "d"], fault=fault, fault_after=2)])
    resp, frames = stream(http, model=model)
    assert resp.status_code == 200
    t = types(frames)
    assert t[0] == "stream_start" and t[-1] == "stream_end"
    assert [f["data"]["delta"] for f in frames if f["event"] == "text_delta"] == ["a", "b"]
    end = frames[-1]["data"]
    assert end["finish_reason"] == "Error"
    assert end["error"]["type"] in ("upstream_error", "overloaded_error") and end["error"]["message"]
    assert len(fake.requests) == 1, "no retry after the first token"


def test_stream_client_disconnect_closes_upstream(server: Any, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=[f"t{i} " for i in range(200)], delay=0.05)])
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream(
            "POST", "/v1/messages", json={"model": "gpt", "max_tokens": 300, "messages": USER, "stream": True}
        ) as resp:
            seen = 0
            for line in resp.iter_lines():
                if line == "event: text_delta":
                    seen += 1
                    if seen == 3:
                        break
        closed_at = time.monotonic()
    rec = fake.requests[0]
    upstream_closed = fake.wait_for_client_close(rec, timeout=3)
    assert upstream_closed - closed_at < 1.0
    assert not rec.completed


def _post_then_drop(url: str, payload: dict[str, Any], fake: FakeUpstream) -> float:
    import socket

    body = httpx.Request("POST", url + "/v1/messages", json=payload)
    raw = (
        f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body.content)}\r\n\r\n"
    ).encode() + body.content
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(raw)
    fake.wait_for_requests(1, timeout=5)
    s.close()
    return time.monotonic()


@pytest.mark.parametrize("streamed", [True, False])
def test_disconnect_before_first_token_closes_upstream(server: Any, fake: FakeUpstream, streamed: bool) -> None:
    fake.script("gpt-up", [Reply(fault=Fault.HANG)])
    closed_at = _post_then_drop(
        server.url, {"model": "gpt", "max_tokens": 4, "messages": USER, "stream": streamed}, fake
    )
    upstream_closed = fake.wait_for_client_close(fake.requests[0], timeout=3)
    assert upstream_closed - closed_at < 1.0


def test_keepalive_comment_while_idle(http: httpx.Client, fake: FakeUpstream) -> None:
    # The test server sends keep-alives after 1 s of silence (keepalive_s: 1).
    fake.script("gpt-up", [Reply(tokens=["a", "b"], delay=1.4)])
    with http.stream(
        "POST", "/v1/messages", json={"model": "gpt", "max_tokens": 4, "messages": USER, "stream": True}
    ) as resp:
        raw = resp.read()
    assert b"\n\n: keepalive\n\n" in raw
    assert types(parse_sse(raw))[-1] == "stream_end"


def test_alias_resolves(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["ok"])])
    msg = http.post("/v1/messages", json={"model": "gpt-alias", "max_tokens": 4, "messages": USER}).json()
    assert msg["model"] == "gpt"
    assert fake.requests[-1].model == "gpt-up"


def test_streams_keep_every_middlewares_start_and_end(http: httpx.Client, fake: FakeUpstream) -> None:
    """SSE frames go to the server directly (http/direct_body_send.py); the start and the end still pass
    every middleware: the request id and security headers are on the stream, and the frames all arrive."""
    fake.script("gpt-up", [Reply(tokens=[f"t{i} " for i in range(20)])])
    body = {"model": "gpt", "max_tokens": 32, "messages": USER, "stream": True}
    with http.stream("POST", "/v1/messages", json=body, headers={"x-request-id": "stream-77"}) as resp:
        raw = resp.read()
    assert resp.headers["x-request-id"] == "stream-77" and resp.headers["x-content-type-options"] == "nosniff"
    frames = parse_sse(raw)
    assert [f["id"] for f in frames] == list(range(1, len(frames) + 1))
    assert sum(f["event"] == "text_delta" for f in frames) == 20 and frames[-1]["event"] == "stream_end"


def test_request_id_is_echoed_or_generated(http: httpx.Client) -> None:
    resp = http.get("/healthz", headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    resp = http.get("/healthz", headers={"x-request-id": "bad id\u00e9".encode("latin-1")})
    assert resp.headers["x-request-id"].startswith("req_")
    resp = http.get("/nope")
    assert resp.status_code == 404
    assert resp.json()["request_id"] == resp.headers["x-request-id"]


def test_models_health_and_openapi(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in models}
    assert by_id["local"]["default"] is True and by_id["local"]["provider"] == "local"
    assert by_id["gpt"]["aliases"] == ["gpt-alias"]
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    doc = http.get("/openapi.json").json()
    for path in ("/v1/messages", "/v1/models", "/healthz", "/readyz"):
        assert path in doc["paths"], path
    post = doc["paths"]["/v1/messages"]["post"]
    assert post["requestBody"]["content"]["application/json"]["example"]["messages"]
    assert "ChatRequest" in doc["components"]["schemas"]


def test_local_model_streamed(http: httpx.Client) -> None:
    resp, frames = stream(http, max_tokens=24, messages=[{"role": "user", "content": "Say hello."}])
    assert resp.status_code == 200
    t = types(frames)
    assert t[:3] == ["stream_start", "step_start", "text_start"] and t[-2:] == ["step_finish", "stream_end"]
    deltas = [f["data"]["delta"] for f in frames if f["event"] == "text_delta"]
    assert len(deltas) >= 2, "tokens arrive one by one"
    complete = next(f["data"]["text"] for f in frames if f["event"] == "text_complete")
    assert complete == "".join(deltas) and complete.strip()
    end = frames[-1]["data"]
    assert frames[0]["data"]["model"] == "local" and frames[0]["data"]["provider"] == "local"
    assert end["finish_reason"] in ("Stop", "Length")
    assert 1 <= end["usage"]["completion_tokens"] <= 24 and end["usage"]["prompt_tokens"] > 0


def test_local_model_folded_with_sampling(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/messages",
        json={
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Count to ten."}],
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.9,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.1,
            "seed": 1,
        },
    )
    assert resp.status_code == 200, resp.text
    msg = resp.json()
    assert msg["model"] == "local" and msg["content"][0]["type"] == "text" and msg["content"][0]["text"]
    assert msg["finish_reason"] == "Length" and msg["usage"]["completion_tokens"] == 8
    assert msg.get("warnings") is None


def test_cancelling_local_model_stops_generation(http: httpx.Client) -> None:
    # The local model has one slot (max_concurrency 1): a second run can only start quickly
    # if cancelling the first really stopped llama.cpp mid-generation.
    long_run = http.post(
        "/v1/messages/async",
        json={
            "model": "local",
            "max_tokens": 4000,
            "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a very long story."}],
        },
    ).json()["message_id"]
    with http.stream("GET", f"/v1/messages/async/{long_run}/stream") as resp:
        for line in resp.iter_lines():
            if line == "event: text_delta":
                break
    assert http.post(f"/v1/messages/async/{long_run}/cancel").status_code == 200
    started = time.monotonic()
    resp = http.post(
        "/v1/messages", json={"model": "local", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 4
    # Generous for a loaded machine: an uncancelled 4000-token generation would hold the slot for minutes.
    assert time.monotonic() - started < 20, "the cancelled generation released the model at once"
    status = http.get(f"/v1/messages/async/{long_run}/status").json()
    assert status["status"] == "cancelled"


def test_metrics(http: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("gpt-up", [Reply(tokens=["a", "b"], usage=(5, 2))])
    before = http.get("/metrics").text
    assert http.post("/v1/messages", json={"model": "gpt", "max_tokens": 4, "messages": USER}).status_code == 200
    after = http.get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")

    def value(text: str, line_start: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))

    key = 'backstream_runs_finished_total{finish_reason="Stop",kind="sync",model="gpt"}'
    assert value(after.text, key) == value(before, key) + 1
    assert value(after.text, 'backstream_tokens_total{direction="completion",model="gpt"}') >= 2
    assert "backstream_background_runs_pending" in after.text
