"""Every Redis key and channel name Backstream uses, in one place.

Keys that a Lua script touches together share a hash tag (`{…}`), so Redis Cluster
keeps them in one slot: a run's meta and events (`{tenant/id}`), a model's queue and
running set (`{model}`), a quota scope's counters (`{scope}`).
"""

from __future__ import annotations

Key = tuple[str, str]  # (tenant, message_id)


class RedisKeys:
    """Key names under one deployment's prefix (several deployments or test runs can share one Redis)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.control_channel = f"{prefix}:control"  # work / cancel / deleted messages between replicas

    # --- runs (store/redis.py) ---------------------------------------------------------
    def run_meta(self, key: Key) -> str:
        return f"{self.prefix}:run:{{{key[0]}/{key[1]}}}:meta"

    def run_events(self, key: Key) -> str:
        return f"{self.prefix}:run:{{{key[0]}/{key[1]}}}:events"

    def runs_index(self, tenant: str) -> str:
        """A tenant's runs for listing: a sorted set, member message_id, score created_at in ms."""
        return f"{self.prefix}:runs:{{{tenant}}}"

    @staticmethod
    def run_of_events(events_key: bytes) -> Key:
        """The run whose events stream this is (inverse of run_events)."""
        inner = events_key.decode().split("{", 1)[1].rsplit("}", 1)[0]
        tenant, _, mid = inner.partition("/")
        return (tenant, mid)

    # --- work queue (background/redis_dispatch.py) -------------------------------------------
    def queue(self, model: str) -> str:
        return f"{self.prefix}:queue:{{{model}}}"

    def running(self, model: str) -> str:
        return f"{self.prefix}:running:{{{model}}}"

    # --- limits (quotas.py) -----------------------------------------------------------------
    def rate_window(self, scope: str, window: int) -> str:
        return f"{self.prefix}:rate:{{{scope}}}:{window}"

    def quota_set(self, name: str) -> str:
        return f"{self.prefix}:quota:{{{name}}}"


def member(tenant: str, message_id: str) -> str:
    """A run as a member of the queue and running sets."""
    return f"{tenant}/{message_id}"


def split_member(m: bytes | str) -> Key:
    text = m.decode() if isinstance(m, bytes) else m
    tenant, _, mid = text.partition("/")
    return tenant, mid
