"""Prometheus metrics. Counted per run and per request, never per event (the hot path stays untouched).

Model metrics follow the OpenTelemetry GenAI semantic conventions where one exists, in their
Prometheus form (dots become underscores, the unit a suffix): `gen_ai_server_time_to_first_token_seconds`,
`gen_ai_server_time_per_output_token_seconds`, `gen_ai_server_request_duration_seconds`,
`gen_ai_client_token_usage`, labelled `gen_ai_request_model` (the configured model name that
served the call), `gen_ai_provider_name`, `gen_ai_token_type` (input | output) and `error_type`.
The rest are Backstream's own (`backstream_*`). Labels are bounded: configured model names,
route templates, statuses; runs and HTTP requests get a `tenant` label only with
`metrics.tenant_labels: true`.
"""

from __future__ import annotations

import time
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .config import ModelConfig

REGISTRY = CollectorRegistry(auto_describe=True)

_TENANT_LABELS = False


def _tenant_metrics(tenant: list[str]) -> tuple[Counter, Counter, Counter]:
    """The metrics that may carry a tenant label (`tenant` is [] or ["tenant"]), built once the config is known."""
    # Runs: started and finished count per *requested* model, so that they agree under fallbacks.
    started = Counter("backstream_runs_started", "Runs started", ["kind", "model", *tenant], registry=REGISTRY)
    finished = Counter(
        "backstream_runs_finished",
        "Runs ended, by finish reason (model: the requested one)",
        ["kind", "model", "finish_reason", *tenant],
        registry=REGISTRY,
    )
    # HTTP: by route template (never the raw path with ids) and status.
    requests = Counter(
        "backstream_http_requests", "HTTP requests answered", ["method", "route", "status", *tenant], registry=REGISTRY
    )
    return started, finished, requests


RUNS_STARTED, RUNS_FINISHED, HTTP_REQUESTS = _tenant_metrics([])
EVENTS = Counter("backstream_events", "Events produced by runs", ["kind"], registry=REGISTRY)
TOKENS = Counter("backstream_tokens", "Tokens reported by upstreams", ["model", "direction"], registry=REGISTRY)
ACTIVE_RUNS = Gauge("backstream_background_runs_active", "Background runs executing in this process", registry=REGISTRY)
PENDING_RUNS = Gauge(
    "backstream_background_runs_pending", "Background runs of this process waiting to start", registry=REGISTRY
)
SYNC_RUNS_ACTIVE = Gauge("backstream_sync_runs_active", "Synchronous runs in progress", registry=REGISTRY)
WATCHERS_ACTIVE = Gauge("backstream_watchers_active", "Open watch streams of background runs", registry=REGISTRY)
RUN_SECONDS = Histogram(
    "backstream_run_seconds",
    "Run duration",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)

# Upstream calls: errors by kind (the error type), retries, fallbacks taken.
UPSTREAM_ERRORS = Counter(
    "backstream_upstream_errors",
    "Failed upstream calls, by model, provider and kind (upstream_error, overloaded_error, timeout_error, …)",
    ["model", "provider", "kind"],
    registry=REGISTRY,
)
RETRIES = Counter("backstream_upstream_retries", "Upstream calls tried again", ["model"], registry=REGISTRY)
FALLBACKS = Counter(
    "backstream_fallbacks", "Runs answered by a fallback model", ["model", "fallback"], registry=REGISTRY
)

HTTP_SECONDS = Histogram(
    "backstream_http_request_duration_seconds",
    "HTTP request duration, until the last byte (SSE streams: until they end)",
    ["method", "route"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

STORE_FLUSH_SECONDS = Histogram(
    "backstream_store_flush_seconds",
    "Store write latency: one group commit (all runs' pending events)",
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
WEBHOOK_DELIVERIES = Counter(
    "backstream_webhook_deliveries", "Webhook deliveries, by outcome", ["outcome"], registry=REGISTRY
)

# OpenTelemetry GenAI conventions (buckets as the conventions advise).
_GENAI = ["gen_ai_request_model", "gen_ai_provider_name"]
TIME_TO_FIRST_TOKEN = Histogram(
    "gen_ai_server_time_to_first_token_seconds",
    "Time to generate the first token (from the run's start, model slot wait included)",
    _GENAI,
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "gen_ai_server_time_per_output_token_seconds",
    "Time per output token after the first, per run",
    _GENAI,
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
)
REQUEST_DURATION = Histogram(
    "gen_ai_server_request_duration_seconds",
    "Duration of a run, from its start to its end",
    [*_GENAI, "error_type"],
    registry=REGISTRY,
    buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92),
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per run, by direction (gen_ai_token_type: input | output)",
    [*_GENAI, "gen_ai_token_type"],
    registry=REGISTRY,
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
)


class RunStats(Protocol):
    """What `record_run` reads off a run (engine.Run)."""

    config: ModelConfig  # requested
    served_by: ModelConfig
    seq: int
    usage: dict[str, int | None]
    finish_reason: str | None
    error: dict[str, str] | None
    started_at: float | None  # time.monotonic() when the run loop began
    first_token_at: float | None  # … when the first upstream delta arrived


def configure(tenant_labels: bool) -> None:
    """`metrics.tenant_labels`: rebuild the metrics that carry a tenant label (once, before any is counted)."""
    global _TENANT_LABELS, RUNS_STARTED, RUNS_FINISHED, HTTP_REQUESTS
    if tenant_labels == _TENANT_LABELS:
        return
    for metric in (RUNS_STARTED, RUNS_FINISHED, HTTP_REQUESTS):
        REGISTRY.unregister(metric)
    _TENANT_LABELS = tenant_labels
    RUNS_STARTED, RUNS_FINISHED, HTTP_REQUESTS = _tenant_metrics(["tenant"] if tenant_labels else [])


def tenant_labels(tenant: str | None) -> tuple[str, ...]:
    """The tenant label's value, when tenant labels are on; else nothing."""
    return (tenant or "",) if _TENANT_LABELS else ()


def run_started(kind: str, model: str, tenant: str | None) -> None:
    RUNS_STARTED.labels(kind, model, *tenant_labels(tenant)).inc()


def http_request(method: str, route: str, status: int, tenant: str | None, seconds: float) -> None:
    HTTP_REQUESTS.labels(method, route, str(status), *tenant_labels(tenant)).inc()
    HTTP_SECONDS.labels(method, route).observe(seconds)


def record_run(kind: str, run: RunStats, seconds: float, tenant: str | None = None, finish: str | None = None) -> None:
    """Once per run, when it ended: the run counters by requested model, the GenAI metrics by served model."""
    finish_reason = run.finish_reason or finish or "none"
    RUNS_FINISHED.labels(kind, run.config.name, finish_reason, *tenant_labels(tenant)).inc()
    EVENTS.labels(kind).inc(run.seq)
    RUN_SECONDS.labels(kind).observe(seconds)
    model, provider = run.served_by.name, run.served_by.provider
    prompt, completion = run.usage.get("prompt_tokens") or 0, run.usage.get("completion_tokens") or 0
    if prompt:
        TOKENS.labels(model, "prompt").inc(prompt)
        TOKEN_USAGE.labels(model, provider, "input").observe(prompt)
    if completion:
        TOKENS.labels(model, "completion").inc(completion)
        TOKEN_USAGE.labels(model, provider, "output").observe(completion)
    if run.started_at is None:
        return  # never reached the run loop
    now = time.monotonic()
    error_type = (run.error or {}).get("type", "") if finish_reason == "Error" else ""
    REQUEST_DURATION.labels(model, provider, error_type).observe(now - run.started_at)
    if run.first_token_at is not None:
        TIME_TO_FIRST_TOKEN.labels(model, provider).observe(run.first_token_at - run.started_at)
        if completion > 1:
            TIME_PER_OUTPUT_TOKEN.labels(model, provider).observe((now - run.first_token_at) / (completion - 1))


def upstream_failed(model: str, provider: str, kind: str) -> None:
    UPSTREAM_ERRORS.labels(model, provider, kind).inc()


def render() -> bytes:
    return generate_latest(REGISTRY)
