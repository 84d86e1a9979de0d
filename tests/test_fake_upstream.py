"""Proves tests/support/fake_upstream is faithful enough for the official SDKs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import httpx
import httpx2  # the transport both SDKs use
import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, Fault, Recorded, Reply, ToolCall

ROOT = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "hi"}]


# Own fixtures (shadowing conftest's session-wide `fake`): one fake per module, reset per test.
@pytest.fixture(scope="module")
def _fake_upstream():
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(_fake_upstream: FakeUpstream):
    _fake_upstream.reset()
    yield _fake_upstream
    _fake_upstream.wait_until_idle(2.0)


@pytest.fixture
def oai(fake: FakeUpstream):
    client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def ant(fake: FakeUpstream):
    client = anthropic.Anthropic(base_url=fake.url, api_key="x", max_retries=0)
    yield client
    client.close()


def _raw(fake: FakeUpstream, path: str, body: dict | bytes, *, close: bool = True, timeout: float = 3.0) -> bytes:
    """Send one request on a fresh socket, read until the server closes it."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode()
    with socket.create_connection((fake.host, fake.port), timeout=timeout) as s:
        s.sendall(head + data)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


# ----------------------------------------------------------------- OpenAI


def test_openai_stream_text_reasoning_usage(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("o-text", [Reply(tokens=["Hel", "lo", "!"], reasoning=["hmm", " ok"], usage=(7, 3))])
    stream = oai.chat.completions.create(
        model="o-text", messages=MSGS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text, reasoning, finish, usage = "", "", None, None
    for ch in chunks:
        assert ch.object == "chat.completion.chunk" and ch.model == "o-text"
        if ch.usage is not None:
            usage = ch.usage
            assert ch.choices == []
        for c in ch.choices:
            text += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == "Hello!"
    assert reasoning == "hmm ok"
    assert finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 3, 10)
    assert usage.completion_tokens_details.reasoning_tokens == 2
    # Reasoning strictly before text.
    kinds = [
        "r" if (ch.choices[0].delta.model_extra or {}).get("reasoning_content") else "t"
        for ch in chunks
        if ch.choices
        and (ch.choices[0].delta.content or (ch.choices[0].delta.model_extra or {}).get("reasoning_content"))
    ]
    assert kinds == ["r", "r", "t", "t", "t"]

    (rec,) = fake.wait_for_requests(1)
    assert rec.path == "/v1/chat/completions" and rec.model == "o-text"
    assert rec.body["stream"] is True and rec.headers["authorization"] == "Bearer x"
    fake.wait_for_finish(rec)
    assert rec.completed and rec.finished_at is not None and rec.client_closed_at is None


def test_openai_stream_without_include_usage_has_no_usage_chunk(fake: FakeUpstream, oai: openai.OpenAI):
    chunks = list(oai.chat.completions.create(model="o-nousage", messages=MSGS, stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world!"


def test_openai_stream_tool_calls(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script(
        "o-tools",
        Reply(
            tokens=["Let me check."],
            tool_calls=[
                ToolCall("call_a", "get_weather", ['{"ci', 'ty": "Par', 'is"}']),
                ToolCall("call_b", "get_time", ['{"tz":', ' "CET"}']),
            ],
        ),
    )
    calls: dict[int, dict] = {}
    finish = None
    for ch in oai.chat.completions.create(model="o-tools", messages=MSGS, stream=True):
        for c in ch.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "args": ""})
                if tc.id:
                    slot["id"] = tc.id
                    assert tc.type == "function"
                if tc.function and tc.function.name:
                    slot["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    slot["args"] += tc.function.arguments
    assert finish == "tool_calls"
    assert calls[0]["id"] == "call_a" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["args"]) == {"city": "Paris"}
    assert calls[1]["id"] == "call_b" and json.loads(calls[1]["args"]) == {"tz": "CET"}


def test_openai_non_stream(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script(
        "o-whole",
        Reply(tokens=["a", "b"], reasoning=["r"], tool_calls=[ToolCall("c1", "f", ['{"x":', "1}"])], ttft=0.1),
    )
    t0 = time.monotonic()
    r = oai.chat.completions.create(model="o-whole", messages=MSGS)
    assert time.monotonic() - t0 >= 0.1
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.content == "ab"
    assert (msg.model_extra or {}).get("reasoning_content") == "r"
    assert msg.tool_calls[0].id == "c1" and json.loads(msg.tool_calls[0].function.arguments) == {"x": 1}
    assert r.choices[0].finish_reason == "tool_calls"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (10, 2)


def test_openai_finish_reason_length(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("o-len", Reply(finish_reason="length"))
    chunks = list(oai.chat.completions.create(model="o-len", messages=MSGS, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


# -------------------------------------------------------------- Anthropic


def test_anthropic_stream_text_thinking_tool_use(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script(
        "a-all",
        Reply(
            reasoning=["Think", "ing"],
            tokens=["Hi", " there"],
            tool_calls=[ToolCall("toolu_1", "get_weather", ['{"ci', 'ty": "Par', 'is"}'])],
            usage=(12, 5),
            cache=(3, 4),
        ),
    )
    with ant.messages.stream(model="a-all", max_tokens=100, messages=MSGS) as stream:
        text = "".join(stream.text_stream)
        msg = stream.get_final_message()
    assert text == "Hi there"
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == "Thinking" and msg.content[0].signature
    assert msg.content[1].text == "Hi there"
    assert msg.content[2].id == "toolu_1" and msg.content[2].name == "get_weather"
    assert msg.content[2].input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"
    assert msg.model == "a-all" and msg.role == "assistant"
    assert msg.usage.input_tokens == 12 and msg.usage.output_tokens == 5
    assert msg.usage.cache_creation_input_tokens == 3 and msg.usage.cache_read_input_tokens == 4
    (rec,) = fake.wait_for_requests(1)
    assert rec.path == "/v1/messages" and rec.body["stream"] is True and rec.body["max_tokens"] == 100


def test_anthropic_raw_events_order(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script("a-raw", Reply(tokens=["x", "y"], finish_reason="stop_sequence"))
    events = list(ant.messages.create(model="a-raw", max_tokens=10, messages=MSGS, stream=True))
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.usage.output_tokens == 1
    assert events[1].index == 0 and events[1].content_block.type == "text"
    assert events[5].delta.stop_reason == "stop_sequence" and events[5].usage.output_tokens == 2


def test_anthropic_stop_reason_mapping(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script("a-len", [Reply(finish_reason="length"), Reply(finish_reason="end_turn")])
    with ant.messages.stream(model="a-len", max_tokens=10, messages=MSGS) as s:
        assert s.get_final_message().stop_reason == "max_tokens"
    with ant.messages.stream(model="a-len", max_tokens=10, messages=MSGS) as s:
        assert s.get_final_message().stop_reason == "end_turn"


def test_anthropic_non_stream(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script("a-whole", Reply(tokens=["a", "b"], reasoning=["r"], tool_calls=[ToolCall("t1", "f", ['{"q": 2}'])]))
    msg = ant.messages.create(model="a-whole", max_tokens=10, messages=MSGS)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[1].text == "ab" and msg.content[2].input == {"q": 2}
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 2


# ----------------------------------------------------------- status codes


def test_status_errors(fake: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic):
    fake.script("e429", Reply(status=429))
    fake.script("e500", Reply(status=500))
    fake.script("e529", Reply(status=529, retry_after="7"))

    with pytest.raises(openai.RateLimitError) as ei:
        oai.chat.completions.create(model="e429", messages=MSGS, stream=True)
    assert ei.value.response.headers["retry-after"] == "0"
    assert ei.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError) as ei:
        oai.chat.completions.create(model="e500", messages=MSGS)
    assert ei.value.body["type"] == "server_error"

    with pytest.raises(anthropic.RateLimitError) as ei:
        ant.messages.create(model="e429", max_tokens=10, messages=MSGS, stream=True)
    assert ei.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.InternalServerError) as ei:
        with ant.messages.stream(model="e500", max_tokens=10, messages=MSGS) as s:
            s.get_final_message()
    assert ei.value.body["error"]["type"] == "api_error"
    with pytest.raises(anthropic.OverloadedError) as ei:
        ant.messages.create(model="e529", max_tokens=10, messages=MSGS)
    assert ei.value.response.headers["retry-after"] == "7"
    assert ei.value.body["error"]["type"] == "overloaded_error"

    recs = fake.wait_for_requests(5)
    assert all(r.completed for r in recs)


def test_script_sequence_then_repeat_last(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("seq", [Reply(status=429), Reply(tokens=["first"]), Reply(tokens=["again"])])
    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="seq", messages=MSGS, stream=True)
    out = []
    for _ in range(3):
        out.append(
            "".join(
                c.choices[0].delta.content or ""
                for c in oai.chat.completions.create(model="seq", messages=MSGS, stream=True)
                if c.choices
            )
        )
    assert out == ["first", "again", "again"]
    recs = fake.wait_for_requests(4)
    assert [r.status for r in recs] == [429, 200, 200, 200]
    assert [r.started_at for r in recs] == sorted(r.started_at for r in recs)


def test_retry_by_sdk_follows_script(fake: FakeUpstream):
    fake.script("retry", [Reply(status=429, retry_after="0.01"), Reply(tokens=["ok"])])
    client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=1)
    try:
        r = client.chat.completions.create(model="retry", messages=MSGS)
    finally:
        client.close()
    assert r.choices[0].message.content == "ok"
    assert len(fake.requests) == 2


# ------------------------------------------------------------------ faults


def test_hang_times_out_and_close_is_seen(fake: FakeUpstream):
    fake.script("hang", Reply(fault=Fault.HANG))
    client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="hang", messages=MSGS, stream=True)
    client.close()
    (rec,) = fake.wait_for_requests(1)
    closed = fake.wait_for_client_close(rec, timeout=2.0)
    assert closed - t0 >= 0.45
    assert closed - time.monotonic() < 0.1
    assert not rec.completed and rec.finished_at is None
    fake.wait_until_idle(1.0)


def test_hang_anthropic_non_stream(fake: FakeUpstream):
    fake.script("hang-a", Reply(fault=Fault.HANG))
    client = anthropic.Anthropic(base_url=fake.url, api_key="x", max_retries=0, timeout=0.3)
    with pytest.raises(anthropic.APITimeoutError):
        client.messages.create(model="hang-a", max_tokens=10, messages=MSGS)
    client.close()
    (rec,) = fake.wait_for_requests(1)
    fake.wait_for_client_close(rec, timeout=2.0)


def test_drop_mid_stream_openai(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("drop", Reply(tokens=["a", "b", "c", "d"], fault=Fault.DROP, fault_after=2))
    got = []
    with pytest.raises(openai.APIConnectionError):
        for ch in oai.chat.completions.create(model="drop", messages=MSGS, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert got == ["a", "b"]
    (rec,) = fake.wait_for_requests(1)
    fake.wait_for_finish(rec)
    assert rec.completed is False and rec.finished_at is not None


def test_drop_mid_stream_anthropic(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script("drop-a", Reply(tokens=["a", "b", "c"], fault=Fault.DROP, fault_after=1))
    got = []
    with pytest.raises(Exception) as ei, ant.messages.stream(model="drop-a", max_tokens=10, messages=MSGS) as s:
        for t in s.text_stream:
            got.append(t)
    assert got == ["a"]
    # This SDK version lets the transport error through unwrapped.
    assert isinstance(ei.value, (httpx2.TransportError, anthropic.APIConnectionError)), repr(ei.value)
    assert "incomplete chunked read" in str(ei.value) or isinstance(ei.value, anthropic.APIConnectionError)


def test_drop_raw_has_no_terminating_chunk(fake: FakeUpstream):
    fake.script("drop-raw", Reply(tokens=["a", "b"], fault=Fault.DROP, fault_after=1))
    fake.script("ok-raw", Reply(tokens=["a", "b"]))
    ok = _raw(fake, "/v1/chat/completions", {"model": "ok-raw", "stream": True})
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    head, _, body = ok.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"text/event-stream" in head
    assert body.endswith(b"0\r\n\r\n") and b"data: [DONE]" in body

    dropped = _raw(fake, "/v1/chat/completions", {"model": "drop-raw", "stream": True}, close=False)
    assert b'"content":"a"' in dropped and b'"content":"b"' not in dropped
    assert not dropped.endswith(b"0\r\n\r\n") and b"[DONE]" not in dropped


def test_malformed_openai(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("bad", Reply(tokens=["a", "b", "c"], fault=Fault.MALFORMED, fault_after=1))
    got = []
    with pytest.raises(ValueError):  # json.JSONDecodeError
        for ch in oai.chat.completions.create(model="bad", messages=MSGS, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert got == ["a"]
    raw = _raw(fake, "/v1/chat/completions", {"model": "bad", "stream": True})
    assert b'data: {"choices": [{"delta": {"content": "x"\n\n' in raw
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # kept going normally


def test_error_event_anthropic_and_openai(fake: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic):
    fake.script("errev", Reply(tokens=["a", "b", "c"], fault=Fault.ERROR_EVENT, fault_after=2))
    got = []
    with pytest.raises(anthropic.APIStatusError) as ei:
        with ant.messages.stream(model="errev", max_tokens=10, messages=MSGS) as s:
            for t in s.text_stream:
                got.append(t)
    assert got == ["a", "b"]
    assert ei.value.body["error"]["type"] == "overloaded_error"

    got = []
    with pytest.raises(openai.APIError) as ei2:
        for ch in oai.chat.completions.create(model="errev", messages=MSGS, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert got == ["a", "b"]
    assert ei2.value.message == "Overloaded"
    recs = fake.wait_for_requests(2)
    for r in recs:
        fake.wait_for_finish(r)
    assert all(r.completed for r in recs)


# ------------------------------------------------------ client close, timing


def test_client_closes_stream_early_openai(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("slow", Reply(tokens=[f"t{i}" for i in range(50)], delay=0.05))
    stream = oai.chat.completions.create(model="slow", messages=MSGS, stream=True)
    n = 0
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            n += 1
            if n == 2:
                break
    stream.close()
    t_close = time.monotonic()
    (rec,) = fake.wait_for_requests(1)
    closed = fake.wait_for_client_close(rec, timeout=1.0)
    assert closed - t_close < 1.0
    assert not rec.completed and rec.finished_at is None
    fake.wait_until_idle(1.0)
    assert fake.open_streams == 0


def test_client_closes_stream_early_anthropic(fake: FakeUpstream, ant: anthropic.Anthropic):
    fake.script("slow-a", Reply(tokens=[f"t{i}" for i in range(50)], delay=0.05))
    with ant.messages.stream(model="slow-a", max_tokens=10, messages=MSGS) as s:
        for i, _ in enumerate(s.text_stream):
            if i == 1:
                break
    t_close = time.monotonic()
    (rec,) = fake.wait_for_requests(1)
    assert fake.wait_for_client_close(rec, timeout=1.0) - t_close < 1.0
    assert not rec.completed


def test_ttft_and_delay_pacing(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("paced", Reply(tokens=["a", "b", "c", "d"], ttft=0.15, delay=0.04))
    t0 = time.monotonic()
    stamps = []
    for ch in oai.chat.completions.create(model="paced", messages=MSGS, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            stamps.append(time.monotonic() - t0)
    assert stamps[0] >= 0.15
    # The first token's arrival can lag its send by a few ms (headers, SDK set-up): half the paced span
    # still tells pacing (0.12 s) from none (~0 s).
    assert stamps[-1] - stamps[0] >= 3 * 0.04 * 0.5
    assert stamps[-1] < 1.0


def test_keep_alive_reuses_one_connection(fake: FakeUpstream, oai: openai.OpenAI, ant: anthropic.Anthropic):
    for _ in range(15):
        list(oai.chat.completions.create(model="ka", messages=MSGS, stream=True))
        oai.chat.completions.create(model="ka", messages=MSGS)
    for _ in range(5):
        with ant.messages.stream(model="ka", max_tokens=10, messages=MSGS) as s:
            s.get_final_message()
    recs = fake.wait_for_requests(35)
    assert all(r.completed and r.client_closed_at is None for r in recs)
    # Connections are pooled and reused.  The sync OpenAI Stream stops reading at [DONE] and
    # closes the response before the terminating chunk is consumed, so httpx discards that
    # connection: one new connection per streamed OpenAI request -- and the fake must not
    # mistake that close for a client abort (checked above).
    assert fake.connections_accepted <= 1 + 15 + 1


def test_keep_alive_raw_sequential_requests_one_socket(fake: FakeUpstream):
    with httpx.Client(base_url=fake.url, limits=httpx.Limits(max_connections=1)) as c:
        for i in range(20):
            r = c.post("/v1/chat/completions", json={"model": "ka2", "stream": bool(i % 2)})
            assert r.status_code == 200
            if i % 2:
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                assert r.json()["choices"][0]["message"]["content"] == "Hello, world!"
    assert fake.connections_accepted == 1
    assert len(fake.wait_for_requests(20)) == 20


def test_concurrency_counters(fake: FakeUpstream):
    fake.script("conc", Reply(tokens=["a"] * 5, delay=0.03))

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0)

        async def one() -> str:
            out = ""
            async for ch in await client.chat.completions.create(model="conc", messages=MSGS, stream=True):
                if ch.choices:
                    out += ch.choices[0].delta.content or ""
            return out

        try:
            return await asyncio.gather(*(one() for _ in range(12)))
        finally:
            await client.close()

    assert asyncio.run(run()) == ["aaaaa"] * 12
    assert fake.peak_open_streams == 12
    fake.wait_until_idle(1.0)
    assert fake.open_streams == 0
    fake.reset()
    assert fake.peak_open_streams == 0 and fake.requests == []


def test_wait_for_requests_timeout(fake: FakeUpstream):
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(1, timeout=0.05)
    rec = Recorded(path="/", headers={}, body={}, model=None, started_at=0.0)
    with pytest.raises(TimeoutError):
        fake.wait_for_client_close(rec, timeout=0.05)


# ------------------------------------------------------- misc endpoints


def test_models_404_and_bad_json(fake: FakeUpstream):
    fake.script("listed-1", Reply())
    fake.script("listed-2", Reply())
    r = httpx.get(fake.base_url + "/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["listed-1", "listed-2"]
    r = httpx.get(fake.url + "/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(fake.base_url + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(fake.base_url + "/messages", content=b"[1]")
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert fake.requests == []
    assert {o.path for o in fake.other_requests} == {"/v1/models", "/nope"}


def test_spec_string_model_in_thread_mode(fake: FakeUpstream, oai: openai.OpenAI):
    text = "".join(
        c.choices[0].delta.content or ""
        for c in oai.chat.completions.create(model="tokens=3;delay_ms=1", messages=MSGS, stream=True)
        if c.choices
    )
    assert text == " tok0 tok1 tok2"
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="tokens=3;status=503", messages=MSGS)
    # Not a spec, no script: default reply.
    r = oai.chat.completions.create(model="plain-model", messages=MSGS)
    assert r.choices[0].message.content == "Hello, world!"


def test_reset_clears_scripts(fake: FakeUpstream, oai: openai.OpenAI):
    fake.script("rs", Reply(tokens=["scripted"]))
    assert oai.chat.completions.create(model="rs", messages=MSGS).choices[0].message.content == "scripted"
    fake.reset()
    assert fake.requests == []
    assert oai.chat.completions.create(model="rs", messages=MSGS).choices[0].message.content == "Hello, world!"


# -------------------------------------------------------------- standalone


def test_standalone_process():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_upstream", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(10)
            assert line and line[0].startswith("READY http://127.0.0.1:"), (line, proc.poll())
            url = line[0].split()[1]
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            t0 = time.monotonic()
            stream = client.chat.completions.create(
                model="tokens=5;ttft_ms=50;delay_ms=5",
                messages=MSGS,
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            for ch in stream:
                usage = ch.usage or usage
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
            assert time.monotonic() - t0 >= 0.05
            assert text == " tok0 tok1 tok2 tok3 tok4"
            assert usage.completion_tokens == 5
            a = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
            with a.messages.stream(model="tokens=2", max_tokens=5, messages=MSGS) as s:
                assert s.get_final_message().content[0].text == " tok0 tok1"
            client.close()
            a.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        err = proc.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err, err
