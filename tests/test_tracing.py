"""OpenTelemetry tracing: the spans of a run (in-process, the SDK's in-memory exporter) and the trace context
carried from an incoming `traceparent` to the upstream request (a real server, tracing on, exporting over
OTLP/HTTP to the fake upstream)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from backstream import tracing
from backstream.config import TracingSettings
from backstream.http.tracing import TracingMiddleware
from tests.support.fake_upstream import FakeUpstream, Reply, ToolCall
from tests.support.mcp_server import McpHttpServer
from tests.support.runs import USER
from tests.support.server import ServerProcess, fake_models
from tests.test_core_run_loop import FakeToolBox, Harness, collect, end_of, model_row, text, tool_call
from tests.test_core_run_loop import h as h  # noqa: F401  (fixtures)
from tests.test_core_run_loop import toolbox as toolbox  # noqa: F401

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_off_by_default_and_on_by_otel_variables() -> None:
    assert tracing.TRACER is None  # nothing configured: the hot path sees None and does nothing
    assert tracing.headers() is None
    assert not tracing.wanted(TracingSettings(), {})
    assert tracing.wanted(TracingSettings(enabled=True), {})
    assert tracing.wanted(TracingSettings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.wanted(TracingSettings(enabled=True), {"OTEL_SDK_DISABLED": "true"})


async def test_run_model_call_and_tool_spans(
    h: Harness,  # noqa: F811
    toolbox: type[FakeToolBox],  # noqa: F811
    spans: InMemorySpanExporter,
) -> None:
    h.script(
        "m",
        [
            *tool_call("add", {"a": 2, "b": 3}),
            ("usage", {"prompt_tokens": 9, "completion_tokens": 4}),
            ("finish", "ToolUse"),
        ],
        text("5"),
    )
    run = h.run(mcp_servers=[{"name": "calc", "url": "http://mcp.invalid/mcp"}])
    events = await collect(run)
    assert end_of(events)["finish_reason"] == "Stop"

    finished = spans.get_finished_spans()
    assert [s.name for s in finished].count("chat m") == 2, [s.name for s in finished]
    named = by_name(spans)
    run_span, tool_span = named["run m"], named["execute_tool add"]
    chats = [s for s in finished if s.name == "chat m"]
    assert run_span.parent is None
    for child in (*chats, tool_span):
        assert child.context.trace_id == run_span.context.trace_id
        assert child.parent is not None and child.parent.span_id == run_span.context.span_id
    first, second = sorted(chats, key=lambda s: s.start_time or 0)
    assert first.kind == SpanKind.CLIENT
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["gen_ai.operation.name"] == "chat"
    assert first.attributes["gen_ai.provider.name"] == "openai"
    assert first.attributes["gen_ai.request.model"] == "m"
    assert first.attributes["gen_ai.usage.input_tokens"] == 9
    assert first.attributes["gen_ai.usage.output_tokens"] == 4
    assert tuple(first.attributes["gen_ai.response.finish_reasons"]) == ("ToolUse",)
    assert tuple(second.attributes["gen_ai.response.finish_reasons"]) == ("Stop",)
    assert tool_span.attributes is not None
    assert tool_span.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool_span.attributes["gen_ai.tool.name"] == "add"
    assert (first.end_time or 0) <= (tool_span.start_time or 0) <= (tool_span.end_time or 0) <= (second.start_time or 0)
    assert run_span.attributes is not None
    assert run_span.attributes["gen_ai.usage.input_tokens"] == 9 + 7
    assert tuple(run_span.attributes["gen_ai.response.finish_reasons"]) == ("Stop",)
    assert toolbox.instances[0].trace_headers is not None  # type: ignore[attr-defined]
    assert tool_span.context.span_id == int(toolbox.instances[0].trace_headers["traceparent"].split("-")[2], 16)  # type: ignore[attr-defined]


async def test_a_failed_model_call_is_an_error_span(h: Harness, spans: InMemorySpanExporter) -> None:  # noqa: F811
    from backstream.providers.base import status_error

    h.table(model_row("m", retries=1))
    h.script("m", status_error(503, "busy"), text("ok"))
    events = await collect(h.run())
    assert end_of(events)["finish_reason"] == "Stop"
    chats = [s for s in spans.get_finished_spans() if s.name == "chat m"]
    assert [s.status.status_code for s in chats] == [StatusCode.ERROR, StatusCode.UNSET]
    assert chats[0].attributes is not None and chats[0].attributes["error.type"]


async def test_http_span_continues_the_callers_trace(spans: InMemorySpanExporter) -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["headers"] = tracing.headers()  # what an upstream request sent from here would carry
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=TracingMiddleware(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        resp = await client.get("/v1/anything", headers={"traceparent": TRACEPARENT})
    assert resp.status_code == 201
    (span,) = spans.get_finished_spans()
    assert span.kind == SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 201
    assert seen["headers"]["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_traceparent_reaches_the_upstream_and_spans_are_exported(
    fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory, model: str
) -> None:
    env = {
        "BACKSTREAM_TRACING__ENABLED": "true",
        "BACKSTREAM_TRACING__ENDPOINT": f"{fake.url}/v1/traces",  # the fake answers 404, after recording it
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    srv = ServerProcess(tmp_path_factory.mktemp("traced"), {"store": "memory", "models": fake_models(fake)}, env=env)
    srv.start()
    try:
        fake.script({"gpt": "gpt-up", "claude": "claude-up"}[model], [Reply(tokens=["hi"])])
        with srv.client() as http:
            resp = http.post(
                "/v1/messages",
                json={"model": model, "max_tokens": 8, "messages": USER},
                headers={"traceparent": TRACEPARENT},
            )
        assert resp.status_code == 200, resp.text
        sent = fake.requests[-1].headers.get("traceparent")
        assert sent is not None, fake.requests[-1].headers
        version, trace_id, span_id, _flags = sent.split("-")
        assert (version, trace_id) == ("00", TRACE_ID)
        assert span_id != "00f067aa0ba902b7"  # the model call's own span, a descendant of the caller's
        assert fake._rec.wait(lambda: any(r.path == "/v1/traces" for r in fake.other_requests), 10)
        export = next(r for r in fake.other_requests if r.path == "/v1/traces")
        assert export.method == "POST" and export.headers["content-type"] == "application/x-protobuf"
    finally:
        srv.stop()


def test_traceparent_reaches_mcp_servers(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> None:
    mcp = McpHttpServer().start()
    config = {
        "store": "memory",
        "models": fake_models(fake),
        "egress": {"allow_hosts": [f"127.0.0.1:{mcp.http_port}"]},
        "tracing": {"enabled": True, "endpoint": f"{fake.url}/v1/traces"},
    }
    srv = ServerProcess(tmp_path_factory.mktemp("traced-mcp"), config).start()
    try:
        add = ToolCall(id="call_1", name="add", arguments=['{"a": 2,', ' "b": 3}'])
        fake.script("gpt-up", [Reply(tokens=[], tool_calls=[add]), Reply(tokens=["5"])])
        body = {"model": "gpt", "max_tokens": 8, "messages": USER, "mcp_servers": [{"name": "calc", "url": mcp.url}]}
        with srv.client() as http:
            resp = http.post("/v1/messages", json=body, headers={"traceparent": TRACEPARENT})
        assert resp.status_code == 200, resp.text
        assert resp.json()["content"][-1] == {"type": "text", "text": "5"}
        assert mcp.traceparents, "the MCP server saw no request"
        assert all(tp is not None and tp.split("-")[1] == TRACE_ID for tp in mcp.traceparents), mcp.traceparents
        assert len(set(mcp.traceparents)) >= 2  # set-up under the run's span, the call under its execute_tool span
        upstream = [r.headers["traceparent"].split("-")[1] for r in fake.requests[-2:]]
        assert upstream == [TRACE_ID, TRACE_ID]
    finally:
        srv.stop()
        mcp.stop()


def test_tracing_without_the_extra_is_a_one_line_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from backstream.config import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name.startswith("opentelemetry") else real(name)
    )
    tracing.check(TracingSettings())  # off: nothing is needed
    with pytest.raises(ConfigError, match=r"pip install 'backstream\[otel\]'"):
        tracing.check(TracingSettings(enabled=True))
