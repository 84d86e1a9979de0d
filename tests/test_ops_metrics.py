"""/metrics scraped after real requests: GenAI histograms, upstream errors, retries, fallbacks, HTTP by route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER, Watcher, slow, start, wait_status
from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = {"provider": "openai", "base_url": fake.base_url, "timeout_s": 5, "backoff_s": 0.01}
    models = [
        {**base, "name": "gpt", "model": "m-gpt-up", "retries": 1},
        {**base, "name": "gpt-fb", "model": "m-fb-up", "retries": 0, "fallbacks": ["claude"]},
        {"name": "claude", "provider": "anthropic", "base_url": fake.url, "model": "m-claude-up", "retries": 0},
    ]
    server = ServerProcess(
        tmp_path_factory.mktemp("ops-metrics"), {"store": "sqlite", "models": models}, name="ops-metrics"
    )
    yield server.start()
    server.stop()


@pytest.fixture()
def c(srv: ServerProcess) -> Iterator[httpx.Client]:
    with srv.client() as client:
        yield client


def scrape(c: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = c.get("/metrics")
    assert resp.status_code == 200
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum over the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def ask(c: httpx.Client, model: str, stream: bool = True) -> httpx.Response:
    resp = c.post("/v1/messages", json={"model": model, "max_tokens": 16, "messages": USER, "stream": stream})
    resp.read()
    return resp


GENAI = {"gen_ai_request_model": "gpt", "gen_ai_provider_name": "openai"}


def test_genai_histograms_grow_once_per_run(c: httpx.Client, fake: FakeUpstream) -> None:
    before = scrape(c)
    fake.script("m-gpt-up", [Reply(tokens=["a", "b", "c", "d"], usage=(7, 4))])
    assert ask(c, "gpt").status_code == 200
    after = scrape(c)
    for name in (
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
        "gen_ai_server_request_duration_seconds_count",
    ):
        assert value(after, name, **GENAI) - value(before, name, **GENAI) == 1, name
    usage = "gen_ai_client_token_usage_sum"
    assert (
        value(after, usage, **GENAI, gen_ai_token_type="input")
        - value(before, usage, **GENAI, gen_ai_token_type="input")
        == 7
    )
    assert (
        value(after, usage, **GENAI, gen_ai_token_type="output")
        - value(before, usage, **GENAI, gen_ai_token_type="output")
        == 4
    )


def test_upstream_errors_and_retries_are_counted(c: httpx.Client, fake: FakeUpstream) -> None:
    before = scrape(c)
    fake.script("m-gpt-up", [Reply(status=500), Reply(status=500)])
    resp = ask(c, "gpt", stream=False)
    assert resp.status_code == 502, resp.text
    after = scrape(c)
    errors = "backstream_upstream_errors_total"
    labels = {"model": "gpt", "provider": "openai", "kind": "upstream_error"}
    assert value(after, errors, **labels) - value(before, errors, **labels) == 2  # the call and its one retry
    assert (
        value(after, "backstream_upstream_retries_total", model="gpt")
        - value(before, "backstream_upstream_retries_total", model="gpt")
        == 1
    )
    duration = "gen_ai_server_request_duration_seconds_count"
    assert (
        value(after, duration, error_type="upstream_error", **GENAI)
        - value(before, duration, error_type="upstream_error", **GENAI)
        == 1
    )


def test_fallbacks_counted_and_started_equals_finished(c: httpx.Client, fake: FakeUpstream) -> None:
    before = scrape(c)
    fake.script("m-fb-up", [Reply(status=500), Reply(status=500)])
    fake.script("m-claude-up", [Reply(tokens=["ok"]), Reply(tokens=["ok"])])
    assert ask(c, "gpt-fb").status_code == 200
    mid = start(c, model="gpt-fb")
    assert wait_status(c, mid, {"completed"})["status"] == "completed"
    after = scrape(c)
    fallbacks = "backstream_fallbacks_total"
    assert (
        value(after, fallbacks, model="gpt-fb", fallback="claude")
        - value(before, fallbacks, model="gpt-fb", fallback="claude")
        == 2
    )
    for kind in ("sync", "background"):
        started = value(after, "backstream_runs_started_total", kind=kind, model="gpt-fb") - value(
            before, "backstream_runs_started_total", kind=kind, model="gpt-fb"
        )
        finished = value(after, "backstream_runs_finished_total", kind=kind, model="gpt-fb") - value(
            before, "backstream_runs_finished_total", kind=kind, model="gpt-fb"
        )
        assert started == finished == 1, (kind, started, finished)
    # the GenAI metrics name the model that served the call
    ttft = "gen_ai_server_time_to_first_token_seconds_count"
    served = {"gen_ai_request_model": "claude", "gen_ai_provider_name": "anthropic"}
    assert value(after, ttft, **served) - value(before, ttft, **served) == 2


def test_http_metrics_by_route_template_and_store_flushes(c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("m-gpt-up", [Reply()])
    mid = start(c, model="gpt")
    wait_status(c, mid, {"completed"})
    with c.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
        resp.read()
    assert c.get("/v1/messages/async/msg_nope/status").status_code == 404
    assert c.get("/no/such/path").status_code == 404
    text = c.get("/metrics").text
    assert mid not in text and "msg_nope" not in text and "/no/such/path" not in text, "no ids or raw paths in labels"
    samples = scrape(c)
    status_route = "/v1/messages/async/{message_id}/status"
    assert value(samples, "backstream_http_requests_total", route=status_route, status="200", method="GET") >= 1
    assert value(samples, "backstream_http_requests_total", route=status_route, status="404", method="GET") >= 1
    assert value(samples, "backstream_http_requests_total", route="unmatched", status="404") >= 1
    assert (
        value(samples, "backstream_http_request_duration_seconds_count", route="/v1/messages/async/{message_id}/stream")
        >= 1
    )
    assert value(samples, "backstream_store_flush_seconds_count") >= 1, "group commits are timed (sqlite)"
    assert value(samples, "backstream_watchers_active") == 0, "the watch ended"
    assert all(dict(ls).get("tenant", "") == "" for (_n, ls) in samples), (
        "no tenant labels unless metrics.tenant_labels"
    )
    for name in ("backstream_webhook_deliveries", "backstream_sync_runs_active", "backstream_background_runs_pending"):
        assert f"# HELP {name}" in text, name


def test_watchers_gauge_counts_open_watch_streams(srv: ServerProcess, c: httpx.Client, fake: FakeUpstream) -> None:
    fake.script("m-gpt-up", [slow(n=40, delay=0.05)])
    mid = start(c, model="gpt")
    watcher = Watcher(srv.url, mid)  # returns once the first event arrived
    assert value(scrape(c), "backstream_watchers_active") == 1
    watcher.join()
    assert watcher.frames[-1]["event"] == "stream_end"
    assert value(scrape(c), "backstream_watchers_active") == 0


def test_tenant_labels_only_when_configured(fake: FakeUpstream, tmp_path: Path) -> None:
    models = [{"name": "gpt", "provider": "openai", "base_url": fake.base_url, "model": "t-gpt-up", "retries": 0}]
    config = {"store": "memory", "models": models, "metrics": {"tenant_labels": True}}
    server = ServerProcess(tmp_path, config, name="ops-metrics-tenants").start()
    try:
        with server.client() as c:
            assert ask(c, "gpt").status_code == 200
            samples = scrape(c)
    finally:
        server.stop()
    assert value(samples, "backstream_runs_started_total", model="gpt", tenant="default") == 1
    assert value(samples, "backstream_runs_finished_total", model="gpt", tenant="default") == 1
    assert value(samples, "backstream_http_requests_total", route="/v1/messages", tenant="default") == 1
