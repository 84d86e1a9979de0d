"""The model table: names and aliases, their providers, fallbacks and concurrency slots."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .config import ModelConfig, Settings
from .errors import Invalid, ModelUnavailable
from .providers import Provider, create_provider
from .providers.base import unavailable_message

UNLIMITED = 2**31  # "no max_concurrency": counted, never waited for


class ModelSlots:
    """Per-model concurrency: at most `max_concurrency` runs at once; waiters start by priority, then arrival."""

    def __init__(self, capacity: dict[str, int | None]) -> None:
        # A model without a limit never waits: remote providers scale on their side.
        self._capacity = {m: UNLIMITED if c is None else c for m, c in capacity.items()}
        self._used = dict.fromkeys(capacity, 0)
        self._waiters: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {m: [] for m in capacity}
        self._order = itertools.count()

    def waiting(self, model: str) -> int:
        return sum(1 for *_, f in self._waiters[model] if not f.done())

    async def acquire(self, model: str, priority: int = 0) -> None:
        if self._used[model] < self._capacity[model] and not self.waiting(model):
            self._used[model] += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters[model], (priority, next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(model)  # the slot was handed over just as we were cancelled
            raise

    @asynccontextmanager
    async def hold(self, model: str, priority: int = 0) -> AsyncIterator[None]:
        """A slot of `model` for the body of the `async with`: released however the body ends."""
        await self.acquire(model, priority)
        try:
            yield
        finally:
            self.release(model)

    def release(self, model: str) -> None:
        waiters = self._waiters[model]
        while waiters:
            *_, fut = heapq.heappop(waiters)
            if not fut.done():
                fut.set_result(None)  # hand the slot straight to the next waiter
                return
        self._used[model] -= 1


class ModelTable:
    """The configured models by name and alias: resolves a request's model, its fallback route, its provider."""

    def __init__(self, settings: Settings) -> None:
        self.default = settings.default_model
        self.models = {m.name: m for m in settings.models}
        self._names = {n: m for m in settings.models for n in (m.name, *m.aliases)}
        self._providers: dict[str, Provider] = {}
        self.slots = ModelSlots({m.name: m.max_concurrency for m in settings.models})

    def lookup(self, name: str | None) -> ModelConfig:
        """The model a name or alias (None: the default) stands for."""
        config = self._names.get(name or self.default)
        if config is None:
            available = ", ".join(sorted(self._names))
            raise Invalid(f"unknown model {name!r}; available: {available}", "model")
        return config

    def resolve(self, name: str | None) -> ModelConfig:
        """The model a request may run on: ModelUnavailable when it cannot be called as configured."""
        config = self.lookup(name)
        if config.provider == "embeddings":
            raise Invalid(
                f"model {config.name!r} is an embeddings model (for semantic_search_v1); it cannot answer chat requests",
                "model",
            )
        var = _missing_key(config)
        if var is not None:
            message = unavailable_message(config.name, var)
            raise ModelUnavailable(message, [{"field": "model", "message": message, "type": "model_unavailable"}])
        return config

    def missing_keys(self) -> dict[str, str]:
        """Models whose `api_key_env` variable is unset: model name -> variable name (configuration, not a secret)."""
        missing = {}
        for config in self.models.values():
            var = _missing_key(config)
            if var is not None:
                missing[config.name] = var
        return missing

    def route(self, config: ModelConfig) -> list[ModelConfig]:
        """The model, then its fallbacks (each once)."""
        out = [config]
        for name in config.fallbacks:
            fb = self._names[name]
            # A fallback without its key is skipped, and so is an embeddings model: it never serves chat.
            if fb not in out and fb.provider != "embeddings" and _missing_key(fb) is None:
                out.append(fb)
        return out

    def provider(self, config: ModelConfig) -> Provider:
        if config.provider == "embeddings":
            raise ValueError(f"model {config.name!r} is an embeddings model, not a chat provider")
        p = self._providers.get(config.name)
        if p is None:
            p = self._providers[config.name] = create_provider(config)
        return p

    async def check(self) -> dict[str, str]:
        """Readiness problems by model name (empty: all usable)."""
        problems = {}
        for config in self.models.values():
            if config.provider == "embeddings":  # no chat provider: only its key can be missing
                var = _missing_key(config)
                reason = None if var is None else f"environment variable {var} (api_key_env) is not set"
            else:
                reason = await self.provider(config).check()
            if reason:
                problems[config.name] = reason
        return problems

    async def aclose(self) -> None:
        for p in self._providers.values():
            await p.aclose()
        self._providers.clear()


def _missing_key(config: ModelConfig) -> str | None:
    """The name of the `api_key_env` variable when it is configured but unset or empty."""
    var = config.api_key_env
    return var if var and not os.environ.get(var) else None
