"""Shared fixtures: real server processes over real HTTP, and a fake upstream at the wire level."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
# The suite's own Redis database; concurrent runs on one machine each pick another one.
REDIS_URL = os.environ.get("BACKSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LOG_DIR = Path(os.environ.get("BACKSTREAM_TEST_LOGS", ROOT / ".pytest_cache" / "server-logs"))
# Every credential a test uses; test_zz_logs.py checks that no server log ever contains one.
SECRETS: set[str] = set()


def pytest_sessionstart(session: pytest.Session) -> None:
    import shutil

    shutil.rmtree(LOG_DIR, ignore_errors=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`backstream serve` as a subprocess with its own config file and data dir."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None, name: str = "server") -> None:
        self.tmp = tmp
        self.config = config
        self.extra_env = env or {}
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{self.port}.log"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        config_path = self.tmp / f"{self.name}.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKSTREAM_")}
        env.update(self.extra_env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backstream", "serve", "--config", str(config_path), "--port", str(self.port), "--data-dir", str(self.tmp / f"{self.name}-data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.tmp,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 30.0), **kw)


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Frames as dicts {id, event, data}; checks each frame has exactly one data line."""
    frames = []
    for block in raw.split(b"\n\n"):
        if not block.strip() or block.startswith(b":"):
            continue
        frame: dict[str, Any] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            key, _, value = line.partition(b": ")
            assert key.decode() not in frame, f"repeated field {key!r} in frame {block!r}"
            frame[key.decode()] = value.decode()
        frame["id"] = int(frame["id"])
        frame["data"] = orjson.loads(frame["data"])
        frames.append(frame)
    return frames


def fake_models(fake: FakeUpstream) -> list[dict[str, Any]]:
    """A model table pointing at the fake upstream: one entry per behaviour under test."""
    return [
        {"name": "gpt", "provider": "openai", "base_url": fake.base_url, "model": "gpt-up", "retries": 2, "backoff_s": 0.01, "timeout_s": 5, "aliases": ["gpt-alias"]},
        {"name": "claude", "provider": "anthropic", "base_url": fake.url, "model": "claude-up", "retries": 2, "backoff_s": 0.01, "timeout_s": 5},
        {"name": "gpt-fb", "provider": "openai", "base_url": fake.base_url, "model": "gpt-fb-up", "retries": 0, "timeout_s": 5, "fallbacks": ["claude"]},
        {"name": "gpt-slow", "provider": "openai", "base_url": fake.base_url, "model": "gpt-slow-up", "retries": 0, "timeout_s": 0.5},
        {"name": "gpt-x", "provider": "openai", "base_url": fake.base_url, "model": "gpt-x-up", "retries": 0, "timeout_s": 5, "extra_sampling": True},
        {"name": "gpt-one", "provider": "openai", "base_url": fake.base_url, "model": "gpt-one-up", "retries": 0, "timeout_s": 30, "max_concurrency": 1},
        {"name": "gpt-two", "provider": "openai", "base_url": fake.base_url, "model": "gpt-two-up", "retries": 0, "timeout_s": 30, "max_concurrency": 2},
        {"name": "gpt-four", "provider": "openai", "base_url": fake.base_url, "model": "gpt-four-up", "retries": 0, "timeout_s": 30, "max_concurrency": 4},
    ]


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as f:
        yield f


@pytest.fixture(autouse=True)
def _reset_fake(request: pytest.FixtureRequest) -> None:
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()


@pytest.fixture(scope="session")
def server(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the memory store with the local model and the fake-upstream models."""
    tmp = tmp_path_factory.mktemp("server")
    srv = ServerProcess(tmp, {"store": "memory", "models": fake_models(fake), "keepalive_s": 1}).start()
    yield srv
    srv.stop()


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="session", params=["memory", "sqlite", "redis"])
def bg_server(request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server per store backend, for the background-run suite."""
    tmp = tmp_path_factory.mktemp(f"bg-{request.param}")
    config: dict[str, Any] = {"store": request.param, "models": fake_models(fake), "keepalive_s": 1}
    if request.param == "redis":
        config["redis"] = {"url": REDIS_URL, "key_prefix": f"bsbg-{os.getpid()}"}
    srv = ServerProcess(tmp, config, name=f"bg-{request.param}").start()
    yield srv
    srv.stop()


@pytest.fixture()
def bg(bg_server: ServerProcess) -> Iterator[httpx.Client]:
    with bg_server.client() as c:
        yield c


@pytest.fixture(scope="session", autouse=True)
def _redis_test_db() -> Iterator[None]:
    """The suite's Redis database (REDIS_URL) belongs to it: emptied before and after it."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield
    client.flushdb()
    client.close()
