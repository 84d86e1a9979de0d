"""Optional OpenTelemetry tracing: a span per HTTP request, per run, per model call and per tool call.

Off by default. On with `tracing.enabled: true` or the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables (`OTEL_SDK_DISABLED=true` turns it off again);
it needs the `otel` extra (`pip install 'backstream[otel]'`), imported only when tracing is on.

When off, `TRACER` is None and callers check just that: no span objects, no per-token work ever.
Spans carry OpenTelemetry GenAI semantic-convention attributes; the current span's context goes out
as `traceparent` to upstream providers (the SDKs' `extra_headers`) and to MCP servers (a request hook).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .config import ConfigError, TracingSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

TRACER: Tracer | None = None  # None: tracing is off


def wanted(settings: TracingSettings, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return settings.enabled or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def check(settings: TracingSettings) -> None:
    """Start-up check: tracing wanted without the `otel` extra is a one-line failure."""
    import importlib.util

    if wanted(settings) and any(
        importlib.util.find_spec(m) is None for m in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
    ):
        raise ConfigError(_MISSING)


_MISSING = (
    "tracing is enabled (tracing.enabled or OTEL_EXPORTER_OTLP_*) but OpenTelemetry is not installed: "
    "pip install 'backstream[otel]'"
)


def configure(settings: TracingSettings) -> None:
    """Start the OTLP exporter when tracing is wanted; a clear start-up error when the extra is missing."""
    if not wanted(settings):
        install(None)
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(_MISSING) from None
    name = settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or "backstream"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))  # OTEL_RESOURCE_ATTRIBUTES merge in
    exporter = OTLPSpanExporter(endpoint=settings.endpoint) if settings.endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)


def install(provider: Any) -> None:
    """Use this TracerProvider (tests pass one with an in-memory exporter); None turns tracing off."""
    global TRACER
    TRACER = None if provider is None else provider.get_tracer("backstream")


def start(name: str, attributes: dict[str, Any], parent: Span | None = None, kind: str = "INTERNAL") -> Span:
    """A span under `parent`, or under the current context. Only called when TRACER is set."""
    from opentelemetry import trace

    assert TRACER is not None
    context = trace.set_span_in_context(parent) if parent is not None else None
    return TRACER.start_span(name, context=context, kind=trace.SpanKind[kind], attributes=attributes)


@contextlib.contextmanager
def current(span: Span | None) -> Iterator[None]:
    """Make `span` the current one for a block that does not yield (one await: a request goes out)."""
    if span is None:
        yield
        return
    from opentelemetry import context, trace

    token = context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        context.detach(token)


def headers(span: Span | None = None) -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) of `span`, or of the current context; None when tracing is off."""
    if TRACER is None:
        return None
    from opentelemetry import trace
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier, context=trace.set_span_in_context(span) if span is not None else None)
    return carrier or None


def extract(raw_headers: list[tuple[bytes, bytes]]) -> Any:
    """The context an incoming request's `traceparent` names (ASGI headers)."""
    from opentelemetry.propagate import extract as _extract

    carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
    return _extract(carrier)


def fail(span: Span, error_type: str, message: str = "") -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message or error_type))


def usage(span: Span, usage: Mapping[str, Any], finish_reason: str | None) -> None:
    """GenAI usage and finish reason on a run or model-call span."""
    span.set_attribute("gen_ai.usage.input_tokens", int(usage.get("prompt_tokens") or 0))
    span.set_attribute("gen_ai.usage.output_tokens", int(usage.get("completion_tokens") or 0))
    if finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
