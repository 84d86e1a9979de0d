"""Hostile request input over real HTTP (issue 10, points 1, 2, 8, 9): schemas that would fetch
URLs or read files, catastrophic regular expressions, forged log lines, and odd cursors and nesting."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.server import ServerProcess, fake_models

USER = [{"role": "user", "content": "Answer in JSON."}]
CATASTROPHIC = "^(a+)+$"  # backtracking engines take ~2**n steps on "a" * n + "b"


@pytest.fixture(scope="module")
def hard(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own (SQLite store, where a huge cursor used to overflow): a frozen loop here hurts no other test."""
    tmp = tmp_path_factory.mktemp("hardening")
    srv = ServerProcess(
        tmp, {"store": "sqlite", "models": fake_models(fake), "keepalive_s": 1}, name="hardening"
    ).start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(hard: ServerProcess) -> Iterator[httpx.Client]:
    with hard.client(timeout=10.0) as c:
        yield c


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        body = b'{"type": "integer"}'
        self.send_response(200)
        self.send_header("content-type", "application/schema+json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def ref_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that serves a schema for any path and records every fetch."""
    hits: list[str] = []
    handler = type("Recorder", (_Recorder,), {"hits": hits})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", hits
    srv.shutdown()
    srv.server_close()


def chat(**over: Any) -> dict[str, Any]:
    return {"model": "gpt", "max_tokens": 64, "messages": USER, **over}


def output_config(schema: dict[str, Any]) -> dict[str, Any]:
    return {"format": {"type": "json_schema", "schema": schema}}


def assert_422(resp: httpx.Response, field: str) -> str:
    """422 in the shared shape, naming exactly `field`; returns the message."""
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert [d["field"] for d in error["details"]][0] == field, error
    return error["message"]


# --- point 1: schemas never cause I/O -------------------------------------------------


def test_remote_and_file_refs_are_422_and_never_fetched(
    client: httpx.Client, fake: FakeUpstream, ref_server: tuple[str, list[str]], tmp_path: Path
) -> None:
    base, hits = ref_server
    secret = tmp_path / "schema.json"
    secret.write_text('{"type": "integer"}')
    fake.script("gpt-up", Reply(tokens=['{"age": "x"}']))  # what would be validated, had the run started
    sent_before = len(fake.requests)
    cases = [
        ({"output_config": output_config({"$ref": f"{base}/direct.json"})}, "output_config.format.schema.$ref"),
        (
            {"output_config": output_config({"type": "object", "properties": {"age": {"$ref": f"{secret.as_uri()}"}}})},
            "output_config.format.schema.properties.age.$ref",
        ),
        (
            {
                "output_config": output_config(
                    {"$id": f"{base}/root/", "properties": {"age": {"$ref": "relative.json"}}}
                )
            },
            "output_config.format.schema.properties.age.$ref",
        ),
        (
            {"output_config": output_config({"$schema": f"{base}/meta.json", "type": "object"})},
            "output_config.format.schema.$schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": {"allOf": [{"$ref": f"{base}/rf.json"}]}},
                }
            },
            "response_format.json_schema.schema.allOf.0.$ref",
        ),
        (
            {"response_format": {"type": "json_schema", "schema": {"$dynamicRef": f"{base}/dyn.json"}}},
            "response_format.schema.$dynamicRef",
        ),
        (
            {
                "tools": [
                    {
                        "name": "t",
                        "input_schema": {"type": "object", "properties": {"q": {"$ref": f"{base}/tool.json"}}},
                    }
                ]
            },
            "tools.0.input_schema.properties.q.$ref",
        ),
    ]
    for extra, field in cases:
        assert_422(client.post("/v1/messages", json=chat(**extra)), field)
    assert_422(client.post("/v1/messages/async", json=chat(**cases[0][0])), cases[0][1])
    assert hits == [], "a request schema made the server fetch a URL"
    assert len(fake.requests) == sent_before, "a run started for a refused request"


def test_local_refs_still_validate_output(client: httpx.Client, fake: FakeUpstream) -> None:
    schema = {
        "$defs": {"age": {"type": "integer"}},
        "type": "object",
        "properties": {"age": {"$ref": "#/$defs/age"}},
        "required": ["age"],
    }
    fake.script("gpt-up", [Reply(tokens=['{"age": 36}']), Reply(tokens=['{"age": "old"}'])])
    ok = client.post("/v1/messages", json=chat(output_config=output_config(schema))).json()
    assert ok["finish_reason"] == "Stop", ok
    bad = client.post("/v1/messages", json=chat(output_config=output_config(schema))).json()
    assert (
        bad["finish_reason"] == "Error"
        and bad["error"]["type"] == "invalid_output"
        and "age" in bad["error"]["message"]
    )
    assert_422(
        client.post("/v1/messages", json=chat(output_config=output_config({"$ref": "#/$defs/missing"}))),
        "output_config.format.schema.$ref",
    )


# --- point 2: patterns run in linear time ----------------------------------------------


def test_catastrophic_pattern_does_not_freeze_the_server(
    client: httpx.Client, hard: ServerProcess, fake: FakeUpstream
) -> None:
    evil = "a" * 40 + "b"  # Python's re would need ~2**40 steps
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}},
        "patternProperties": {CATASTROPHIC: {"type": "string"}},
        "additionalProperties": False,
    }
    # Warm up first: the first call to a provider imports its SDK on the loop, which is not what is measured here.
    fake.script(
        "gpt-up",
        [
            Reply(tokens=['{"s": "aaa"}']),
            Reply(tokens=[orjson.dumps({"s": evil}).decode()[:20], orjson.dumps({"s": evil}).decode()[20:]]),
        ],
    )
    assert client.post("/v1/messages", json=chat(output_config=output_config(schema))).json()["finish_reason"] == "Stop"
    with ThreadPoolExecutor(1) as pool, hard.client(timeout=2.0) as probe:
        run = pool.submit(client.post, "/v1/messages", json=chat(output_config=output_config(schema)))
        latencies = []
        while not run.done() or not latencies:
            t0 = time.perf_counter()
            assert probe.get("/healthz").status_code == 200
            latencies.append(time.perf_counter() - t0)
        answer = run.result().json()
    assert max(latencies) < 0.1, f"/healthz took {max(latencies) * 1000:.0f} ms while the output was validated"
    assert answer["finish_reason"] == "Error" and answer["error"]["type"] == "invalid_output", answer
    assert "does not match" in answer["error"]["message"]


def test_catastrophic_property_names_under_additional_properties(client: httpx.Client, fake: FakeUpstream) -> None:
    schema = {"type": "object", "patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False}
    fake.script("gpt-up", Reply(tokens=[orjson.dumps({"a" * 40 + "b": 1}).decode()]))
    started = time.perf_counter()
    answer = client.post("/v1/messages", json=chat(output_config=output_config(schema))).json()
    assert time.perf_counter() - started < 2.0
    assert (
        answer["error"]["type"] == "invalid_output"
        and "does not match any of the regexes" in answer["error"]["message"]
    )


# --- point 8: ids cannot carry a line break into the logs -------------------------------


def test_ids_with_a_trailing_newline_are_refused(client: httpx.Client) -> None:
    assert_422(client.post("/v1/messages/async", params={"message_id": "run-1\n"}, json=chat()), "message_id")
    assert client.get("/v1/messages/async/run-1%0A/status").status_code == 404
    tool = {"name": "weather\n", "input_schema": {"type": "object"}}
    assert_422(client.post("/v1/messages", json=chat(tools=[tool])), "tools.0.name")


def test_correlation_id_cannot_forge_a_log_line(client: httpx.Client, hard: ServerProcess, fake: FakeUpstream) -> None:
    marker = f"forged-{time.monotonic_ns()}"
    forged = f"2030-01-01 00:00:00,000 WARNING backstream.auth: {marker}"
    fake.script("gpt-up", Reply(tokens=["ok"]))
    resp = client.post("/v1/messages/async", json=chat(correlation_id=f"c1\n{forged}\r\x1b[2K"))
    assert resp.status_code == 200, resp.text
    deadline = time.monotonic() + 10
    while marker not in hard.log_path.read_text(errors="replace"):  # the run's end is logged with its correlation_id
        assert time.monotonic() < deadline, "the finished run was never logged"
        time.sleep(0.02)
    lines = hard.log_path.read_text(errors="replace").splitlines()
    logged = [line for line in lines if marker in line]
    assert logged and all(not line.startswith(forged) for line in logged), logged
    assert all("correlation_id=c1\\n2030" in line and "\\r\\x1b[2K" in line for line in logged), logged


# --- point 9: odd cursors and deep nesting are 422, not 500 -----------------------------


def _finished_run(client: httpx.Client, fake: FakeUpstream) -> str:
    fake.script("gpt-up", Reply(tokens=["a"]))
    mid = client.post("/v1/messages/async", json=chat()).json()["message_id"]
    with client.stream("GET", f"/v1/messages/async/{mid}/stream") as resp:
        assert b"stream_end" in resp.read()
    return mid


def test_bad_cursors_are_422(client: httpx.Client, fake: FakeUpstream) -> None:
    mid = _finished_run(client, fake)
    url = f"/v1/messages/async/{mid}/stream"
    # "²" is a digit to str.isdigit() but not to int(); headers travel as latin-1
    for header in ["\u00b2", "1\u00b2", "99999999999999999999", str(2**53), "1" * 5000]:
        assert_422(client.get(url, headers={"Last-Event-ID": header.encode("latin-1")}), "Last-Event-ID")  # type: ignore[dict-item]
    resp = client.get(url, params={"after": "99999999999999999999"})
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"].endswith("after"), resp.text
    # the largest cursor allowed is fine: nothing lies beyond it
    with client.stream("GET", url, params={"after": 2**53 - 1}) as resp:
        assert resp.status_code == 200 and b"event:" not in resp.read()
    with client.stream("GET", url, headers={"Last-Event-ID": str(2**53 - 1)}) as resp:
        assert resp.status_code == 200 and b"event:" not in resp.read()


def _nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def _nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"p": schema}}
    return schema


def test_deep_nesting_is_422_naming_the_path(client: httpx.Client, fake: FakeUpstream) -> None:
    message = assert_422(
        client.post("/v1/messages", json=chat(tool_context=_nested(300, 1))), "tool_context" + ".a" * 63
    )
    assert "max_json_depth" in message
    resp = client.post("/v1/messages", json=chat(output_config=output_config(_nested_schema(300))))
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"].startswith(
        "output_config.format.schema.properties.p"
    ), resp.text
    tool = {"name": "t", "input_schema": _nested_schema(300)}
    resp = client.post("/v1/messages/async", json=chat(tools=[tool]))
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"].startswith("tools.0.input_schema"), (
        resp.text
    )
    # within the limit (the body object counts as one level) is accepted
    fake.script("gpt-up", Reply(tokens=["fine"]))
    ok = client.post("/v1/messages", json=chat(tool_context=_nested(62, 1)))
    assert ok.status_code == 200 and ok.json()["finish_reason"] == "Stop", ok.text
