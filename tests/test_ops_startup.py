"""Start-up as an operator meets it: clear one-line failures with exit status 2, a banner, readiness that names a missing key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from backstream import __version__
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.runs import USER
from tests.support.server import ServerProcess, free_port

MISSING = "BACKSTREAM_OPS_TEST_MISSING_KEY"  # never set: ServerProcess drops BACKSTREAM_* from the environment


def serve(
    tmp: Path, *args: str, config: dict | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "backstream", "serve", *args]
    if config is not None:
        (tmp / "c.yaml").write_text(yaml.safe_dump(config))
        argv += ["--config", str(tmp / "c.yaml")]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
    return subprocess.run(argv, cwd=tmp, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert 1 <= len(lines) <= 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return result.stderr


def test_bad_log_level(tmp_path: Path) -> None:
    assert_clean_failure(serve(tmp_path, "--log-level", "loud"), "log.level", "debug")


def test_bad_log_format(tmp_path: Path) -> None:
    assert_clean_failure(serve(tmp_path, "--log-format", "xml"), "log.format")


def test_invalid_config(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("store: [\n")
    assert_clean_failure(serve(tmp_path, "--config", str(tmp_path / "broken.yaml")), "broken.yaml", "YAML")
    assert_clean_failure(serve(tmp_path, config={"store": "nosuch"}), "store")


def test_unwritable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")  # a directory below a file can never be created (even by root)
    where = tmp_path / "a-file" / "data"
    assert_clean_failure(
        serve(tmp_path, "--data-dir", str(where), "--port", str(free_port())), str(where), "data directory"
    )


def test_redis_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = {"BACKSTREAM_STORE": "redis", "BACKSTREAM_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"}
    err = assert_clean_failure(serve(tmp_path, "--port", str(free_port()), env=env), f"127.0.0.1:{port}", "Redis")
    assert "hunter2" not in err, "the URL's password is not printed"


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clean_failure(
            serve(tmp_path, "--port", str(port), "--data-dir", str(tmp_path / "d")), f"127.0.0.1:{port}", "in use"
        )


@pytest.fixture(scope="module")
def keyless(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = [
        {"name": "gpt", "provider": "openai", "base_url": fake.base_url, "model": "s-gpt-up", "retries": 0},
        {
            "name": "nokey",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "s-nokey-up",
            "api_key_env": MISSING,
        },
        {
            "name": "nokey-fb",
            "provider": "anthropic",
            "base_url": fake.url,
            "model": "s-nokey-up",
            "api_key_env": MISSING,
        },
        {
            "name": "to-nokey",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "s-to-up",
            "retries": 0,
            "fallbacks": ["nokey"],
        },
    ]
    server = ServerProcess(
        tmp_path_factory.mktemp("ops-startup"), {"store": "sqlite", "models": models}, name="ops-startup"
    )
    yield server.start()
    server.stop()


def test_banner_names_version_url_store_models_and_warnings(keyless: ServerProcess) -> None:
    log = keyless.log_path.read_text()
    assert f"Backstream {__version__} serving on http://127.0.0.1:{keyless.port}" in log
    assert f"store: sqlite, data in {(keyless.tmp / 'ops-startup-data' / 'backstream.db').resolve()}" in log
    assert "model gpt -> openai s-gpt-up at " in log
    nokey = next(line for line in log.splitlines() if "model nokey ->" in line)
    assert "WARNING" in nokey and MISSING in nokey and "model_unavailable" in nokey
    assert "auth: none (loopback only)" in log and "egress: " in log


def test_readyz_names_the_model_and_its_missing_variable(keyless: ServerProcess) -> None:
    resp = httpx.get(keyless.url + "/readyz")
    assert resp.status_code == 503
    details = {d["field"]: d["message"] for d in resp.json()["error"]["details"]}
    assert set(details) >= {"models.nokey", "models.nokey-fb"} and "models.gpt" not in details
    assert MISSING in details["models.nokey"] and "not ready" in details["models.nokey"]


def test_missing_key_answers_503_model_unavailable_without_calling_upstream(
    keyless: ServerProcess, fake: FakeUpstream
) -> None:
    with keyless.client() as c:
        for path in ("/v1/messages", "/v1/messages/async"):
            resp = c.post(path, json={"model": "nokey", "max_tokens": 8, "messages": USER})
            assert resp.status_code == 503, resp.text
            error = resp.json()["error"]
            assert error["type"] == "model_unavailable" and MISSING in error["message"], error
        ok = c.post("/v1/messages", json={"model": "gpt", "max_tokens": 8, "messages": USER})
        assert ok.status_code == 200, ok.text
    assert [r.model for r in fake.requests] == ["s-gpt-up"], "no request went upstream with a placeholder key"
    # text format: the access line, with the request's context as key=value
    rid, mid = ok.headers["x-request-id"], ok.json()["id"]
    deadline = time.monotonic() + 5
    lines = keyless.log_path.read_text
    # Other lines carry the request id too (the upstream call's): wait for the access line itself.
    while not (found := [ln for ln in lines().splitlines() if f"request_id={rid}" in ln and "backstream.access" in ln]):
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.02)
    assert "backstream.access: POST /v1/messages 200" in found[-1] and f"message_id={mid}" in found[-1]
    assert "tenant=default" in found[-1] and "model=gpt" in found[-1]


def test_a_fallback_without_its_key_is_skipped(keyless: ServerProcess, fake: FakeUpstream) -> None:
    fake.script("s-to-up", [Reply(status=500)])
    with keyless.client() as c:
        resp = c.post("/v1/messages", json={"model": "to-nokey", "max_tokens": 8, "messages": USER})
    assert resp.status_code == 502, resp.text
    assert [r.model for r in fake.requests] == ["s-to-up"], "the keyless fallback was not called"
