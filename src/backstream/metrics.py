"""Prometheus metrics. Counted per run and per request, never per event (the hot path stays untouched)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS_STARTED = Counter("backstream_runs_started", "Runs started", ["kind", "model"], registry=REGISTRY)
RUNS_FINISHED = Counter(
    "backstream_runs_finished", "Runs ended, by finish reason", ["kind", "model", "finish_reason"], registry=REGISTRY
)
EVENTS = Counter("backstream_events", "Events produced by runs", ["kind"], registry=REGISTRY)
TOKENS = Counter("backstream_tokens", "Tokens reported by upstreams", ["model", "direction"], registry=REGISTRY)
ACTIVE_RUNS = Gauge("backstream_background_runs_active", "Background runs executing in this process", registry=REGISTRY)
PENDING_RUNS = Gauge(
    "backstream_background_runs_pending", "Background runs of this process waiting to start", registry=REGISTRY
)
RUN_SECONDS = Histogram(
    "backstream_run_seconds",
    "Run duration",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)


def record_run(
    kind: str, model: str, finish_reason: str | None, events: int, usage: dict[str, int | None], seconds: float
) -> None:
    RUNS_FINISHED.labels(kind, model, finish_reason or "none").inc()
    EVENTS.labels(kind).inc(events)
    RUN_SECONDS.labels(kind).observe(seconds)
    if usage.get("prompt_tokens"):
        TOKENS.labels(model, "prompt").inc(usage["prompt_tokens"] or 0)
    if usage.get("completion_tokens"):
        TOKENS.labels(model, "completion").inc(usage["completion_tokens"] or 0)


def render() -> bytes:
    return generate_latest(REGISTRY)
