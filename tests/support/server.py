"""`backstream serve` as a subprocess, and the settings every server a test starts shares."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml

if TYPE_CHECKING:
    from tests.support.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
# The suite's own Redis database; concurrent runs on one machine each pick another one.
REDIS_URL = os.environ.get("BACKSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# Every server's log goes here; conftest checks them for SECRETS when the session ends.
LOG_DIR = Path(os.environ.get("BACKSTREAM_TEST_LOGS", ROOT / ".pytest_cache" / "server-logs"))
# Every credential a test uses: tests add theirs, and no server log may ever contain one.
SECRETS: set[str] = set()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`backstream serve` as a subprocess with its own config file and data dir."""

    def __init__(
        self, tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None, name: str = "server"
    ) -> None:
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
        argv = [
            sys.executable,
            "-m",
            "backstream",
            "serve",
            "--config",
            str(config_path),
            "--port",
            str(self.port),
            "--data-dir",
            str(self.tmp / f"{self.name}-data"),
        ]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return
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


def fake_models(fake: FakeUpstream) -> list[dict[str, Any]]:
    """A model table pointing at the fake upstream: one entry per behaviour under test."""
    return [
        {
            "name": "gpt",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-up",
            "retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 5,
            "aliases": ["gpt-alias"],
        },
        {
            "name": "claude",
            "provider": "anthropic",
            "base_url": fake.url,
            "model": "claude-up",
            "retries": 2,
            "backoff_s": 0.01,
            "timeout_s": 5,
        },
        {
            "name": "gpt-fb",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-fb-up",
            "retries": 0,
            "timeout_s": 5,
            "fallbacks": ["claude"],
        },
        {
            "name": "gpt-slow",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-slow-up",
            "retries": 0,
            "timeout_s": 0.5,
        },
        {
            "name": "gpt-x",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-x-up",
            "retries": 0,
            "timeout_s": 5,
            "extra_sampling": True,
        },
        {
            "name": "gpt-one",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-one-up",
            "retries": 0,
            "timeout_s": 30,
            "max_concurrency": 1,
        },
        {
            "name": "gpt-two",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-two-up",
            "retries": 0,
            "timeout_s": 30,
            "max_concurrency": 2,
        },
        {
            "name": "gpt-four",
            "provider": "openai",
            "base_url": fake.base_url,
            "model": "gpt-four-up",
            "retries": 0,
            "timeout_s": 30,
            "max_concurrency": 4,
        },
    ]
