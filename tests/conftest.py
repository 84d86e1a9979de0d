"""Fixtures: real server processes over real HTTP, a fake upstream at the wire level, the suite's Redis.

The helpers behind them live in tests/support/. When the session ends, every server log
is checked for the credentials the tests registered in SECRETS (see pytest_sessionfinish).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fake_upstream import FakeUpstream
from tests.support.logs import leaked_secrets, reset_log_dir
from tests.support.server import REDIS_URL, ServerProcess, fake_models


def pytest_sessionstart(session: pytest.Session) -> None:
    reset_log_dir()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Runs after every test, whatever the file order: a credential in any server log fails the run."""
    leaks = leaked_secrets()
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "credentials found in server logs", red=True, bold=True)
        for line in leaks:
            reporter.write_line(line)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """The suite's Redis database (REDIS_URL) belongs to it: emptied before its first user and after the session.

    Opt-in: only tests and fixtures that use Redis ask for it, so the rest run without one.
    """
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


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
def bg_server(
    request: pytest.FixtureRequest, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server per store backend, for the background-run suite."""
    tmp = tmp_path_factory.mktemp(f"bg-{request.param}")
    config: dict[str, Any] = {"store": request.param, "models": fake_models(fake), "keepalive_s": 1}
    if request.param == "redis":
        config["redis"] = {"url": request.getfixturevalue("redis_db"), "key_prefix": f"bsbg-{os.getpid()}"}
    srv = ServerProcess(tmp, config, name=f"bg-{request.param}").start()
    yield srv
    srv.stop()


@pytest.fixture()
def bg(bg_server: ServerProcess) -> Iterator[httpx.Client]:
    with bg_server.client() as c:
        yield c
