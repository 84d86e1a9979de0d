"""Configs for servers that share state: replicas on the suite's Redis, or one SQLite file across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.fake_upstream import FakeUpstream
from tests.support.server import REDIS_URL, ServerProcess, fake_models

LEASE_S = 1.5  # short, so that takeovers of a dead replica's runs happen within a test


def replica_config(fake: FakeUpstream, prefix: str, url: str = REDIS_URL, lease_s: float = LEASE_S) -> dict[str, Any]:
    return {
        "store": "redis",
        "redis": {"url": url, "key_prefix": prefix, "lease_s": lease_s},
        "models": fake_models(fake),
        "keepalive_s": 1,
    }


def replica(
    fake: FakeUpstream, tmp: Path, prefix: str, name: str, url: str = REDIS_URL, lease_s: float = LEASE_S
) -> ServerProcess:
    """One replica of a group sharing `prefix` (not started)."""
    return ServerProcess(tmp, replica_config(fake, prefix, url, lease_s), name=name)


def sqlite_server(fake: FakeUpstream, tmp: Path, name: str = "faults-sqlite", **extra: Any) -> ServerProcess:
    """A server on a SQLite file in `tmp` that survives its restarts (not started)."""
    return ServerProcess(tmp, {"store": "sqlite", "models": fake_models(fake), "keepalive_s": 1, **extra}, name=name)
