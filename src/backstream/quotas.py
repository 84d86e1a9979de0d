"""Per key and per tenant limits: requests per minute, active runs, queued runs.

Each limited scope ("key:<name>", "tenant:<id>") has a fixed one-minute request
window and sets of its active and queued run ids. With the Redis store they live
in Redis, so the limits hold across replicas; otherwise in this process.
"""

from __future__ import annotations

import time
from typing import Any

from .auth import Principal
from .config import LimitsSettings, Quota, Settings
from .errors import RateLimited
from .redis_keys import RedisKeys

_TAKE = """
local n = redis.call('SCARD', KEYS[1])
if tonumber(ARGV[1]) > 0 and n >= tonumber(ARGV[1]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[2])
return 1
"""


def _too_many(message: str, retry_after: int) -> RateLimited:
    return RateLimited(message, retry_after)


class Quotas:
    """Counts requests and runs per API key and tenant against their limits; in Redis when replicas share them."""

    def __init__(
        self, limits: LimitsSettings, key_quotas: dict[str, Quota], redis: Any = None, keys: RedisKeys | None = None
    ) -> None:
        self.limits = limits
        self.key_quotas = key_quotas  # principal name -> its own limits (API keys that set them)
        self.redis = redis
        self.keys = keys or RedisKeys("backstream")
        self._windows: dict[str, tuple[int, int]] = {}
        self._sets: dict[str, set[str]] = {}
        if redis is not None:
            self._take = redis.register_script(_TAKE)

    def scopes(self, principal_name: str, tenant: str) -> list[tuple[str, Quota]]:
        out = []
        key_quota = self.key_quotas.get(principal_name) or self.limits
        if principal_name != "anonymous" and (
            key_quota.requests_per_minute or key_quota.max_active_runs or key_quota.max_queued_runs
        ):
            out.append((f"key:{principal_name}", key_quota))
        tenant_quota = self.limits.tenants.get(tenant, self.limits.tenant_default)
        if tenant_quota.requests_per_minute or tenant_quota.max_active_runs or tenant_quota.max_queued_runs:
            out.append((f"tenant:{tenant}", tenant_quota))
        return out

    # --- requests per minute ------------------------------------------------------------
    async def hit(self, principal: Principal, tenant: str) -> None:
        now = time.time()
        span = self.limits.rate_window_s
        minute = int(now // span)
        retry_after = int(span - now % span) + 1
        for scope, quota in self.scopes(principal.name, tenant):
            if not quota.requests_per_minute:
                continue
            count = await self._count_request(scope, minute)
            if count > quota.requests_per_minute:
                raise _too_many(
                    f"rate limit of {quota.requests_per_minute} requests per minute reached for {scope}", retry_after
                )

    async def _count_request(self, scope: str, minute: int) -> int:
        if self.redis is not None:
            key = self.keys.rate_window(scope, minute)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2 * self.limits.rate_window_s)
                count, _ = await pipe.execute()
            return int(count)
        window, count = self._windows.get(scope, (minute, 0))
        if window != minute:
            window, count = minute, 0
        self._windows[scope] = (window, count + 1)
        return count + 1

    # --- active and queued runs ------------------------------------------------------------
    async def acquire(self, principal_name: str, tenant: str, run_id: str, queued: bool) -> None:
        """Count a new run against its key and tenant; 429 if that would pass a limit (nothing is counted then)."""
        taken: list[str] = []
        try:
            for scope, q in self.scopes(principal_name, tenant):
                for kind, limit in (("active", q.max_active_runs), ("queued", q.max_queued_runs)):
                    if (kind == "queued" and not queued) or not limit:
                        continue
                    name = f"{scope}:{kind}"
                    if not await self._take_slot(name, limit, run_id):
                        what = "active runs" if kind == "active" else "queued runs"
                        raise _too_many(f"limit of {limit} {what} reached for {scope}", 1)
                    taken.append(name)
        except BaseException:
            for name in taken:
                await self._drop(name, run_id)
            raise

    async def started(self, principal_name: str, tenant: str, run_id: str) -> None:
        for scope, _ in self.scopes(principal_name, tenant):
            await self._drop(f"{scope}:queued", run_id)

    async def release(self, principal_name: str, tenant: str, run_id: str) -> None:
        for scope, _ in self.scopes(principal_name, tenant):
            await self._drop(f"{scope}:queued", run_id)
            await self._drop(f"{scope}:active", run_id)

    async def _take_slot(self, name: str, limit: int, run_id: str) -> bool:
        if self.redis is not None:
            return bool(await self._take(keys=[self.keys.quota_set(name)], args=[limit, run_id]))
        members = self._sets.setdefault(name, set())
        if limit and len(members) >= limit:
            return False
        members.add(run_id)
        return True

    async def _drop(self, name: str, run_id: str) -> None:
        if self.redis is not None:
            await self.redis.srem(self.keys.quota_set(name), run_id)
        else:
            self._sets.get(name, set()).discard(run_id)


def build_quotas(settings: Settings, redis: Any = None, keys: RedisKeys | None = None) -> Quotas:
    """Quotas in this process, or (with `redis`) shared by every replica. Only deployment.py calls it."""
    key_quotas = {f"key:{k.name}": k.limits for k in settings.auth.api_keys if k.limits is not None}
    return Quotas(settings.limits, key_quotas, redis, keys)
