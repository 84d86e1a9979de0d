"""Server-side tools of a run: the MCP servers it names, connected through the official `mcp` SDK.

The MCP client is built on anyio task groups, which must be entered and left by
the same task, while a run's events may be pulled by different tasks (the HTTP
response, a background runner). So one worker task owns every MCP session of a
run and serves tool calls handed to it through a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import httpx2
import orjson

from .config import EgressSettings
from .egress import EgressDenied, check_url
from .schema import McpServer, Tool

log = logging.getLogger("backstream.tools")
CONTEXT_ARG = "tool_context"  # a tool whose input schema has this property receives the request's tool_context


class ToolSetupError(Exception):
    """An MCP server could not be reached or listed."""


@dataclass
class RemoteTool:
    server: str
    remote_name: str
    spec: Tool
    wants_context: bool


def _result_text(result: Any) -> tuple[str, bool]:
    parts = []
    for item in getattr(result, "content", None) or ():
        text = getattr(item, "text", None)
        parts.append(text if text is not None else orjson.dumps(item.model_dump(mode="json", exclude_none=True)).decode())
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(orjson.dumps(result.structured_content).decode())
    return "".join(parts), bool(getattr(result, "is_error", False))


class ToolBox:
    def __init__(self, servers: list[McpServer], tool_context: Any, options: Any, reserved_names: set[str]) -> None:
        self.servers = servers
        self.tool_context = tool_context
        self.egress: EgressSettings = options.egress
        self.trusted: frozenset[str] = options.trusted_mcp_urls
        self.timeout_s: float = options.tool_timeout_s
        self.reserved = reserved_names
        self.tools: dict[str, RemoteTool] = {}
        self._calls: asyncio.Queue[Any] = asyncio.Queue()
        self._ready: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def specs(self) -> list[Tool]:
        return [t.spec for t in self.tools.values()]

    def owns(self, name: str) -> bool:
        return name in self.tools

    async def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._worker = asyncio.create_task(self._serve(), name="mcp-tools")
        try:
            await self._ready
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._worker is not None and not self._worker.done():
            self._calls.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), 5)
            except (asyncio.TimeoutError, Exception):
                self._worker.cancel()
                with contextlib.suppress(BaseException):
                    await self._worker

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Run a tool; failures and timeouts come back as (message, True) for the model to see."""
        tool = self.tools[name]
        if tool.wants_context:
            arguments = {**arguments, CONTEXT_ARG: self.tool_context}
        fut: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
        self._calls.put_nowait((tool, arguments, fut))
        return await fut

    # --- the worker task ------------------------------------------------------------
    async def _serve(self) -> None:
        assert self._ready is not None
        connecting = "?"
        try:
            async with contextlib.AsyncExitStack() as stack:
                sessions = {}
                for server in self.servers:
                    connecting = server.name
                    sessions[server.name] = await self._connect(stack, server)
                self._ready.set_result(None)
                async with asyncio.TaskGroup() as group:
                    while True:
                        item = await self._calls.get()
                        if item is None:
                            break
                        tool, arguments, fut = item
                        group.create_task(self._call(sessions[tool.server], tool, arguments, fut))
        except BaseException as exc:
            if not self._ready.done():
                failure = _first_leaf(exc)
                if not isinstance(failure, ToolSetupError):
                    failure = ToolSetupError(f"cannot use MCP server {connecting!r}: {_describe(exc)}")
                self._ready.set_exception(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _connect(self, stack: contextlib.AsyncExitStack, server: McpServer) -> Any:
        from mcp import ClientSession
        from mcp.client.sse import sse_client
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {server.authorization_token}"} if server.authorization_token else {}
        egress = self.egress

        async def check(request: httpx2.Request) -> None:  # every request, redirects included
            if server.url in self.trusted:
                return
            try:
                await check_url(str(request.url), egress)
            except EgressDenied as exc:
                raise ToolSetupError(f"MCP server {server.name}: {exc}") from None

        try:
            assert server.url is not None  # resolved when the request was read
            if server.url.rstrip("/").endswith("/sse"):
                def factory(headers: dict[str, Any] | None = None, timeout: Any = None, auth: Any = None) -> httpx2.AsyncClient:
                    return httpx2.AsyncClient(headers=headers, timeout=timeout, auth=auth, event_hooks={"request": [check]})

                streams = await stack.enter_async_context(sse_client(server.url, headers=headers, timeout=self.timeout_s, httpx_client_factory=factory))
            else:
                client = await stack.enter_async_context(
                    httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(self.timeout_s, read=300), event_hooks={"request": [check]})
                )
                streams = await stack.enter_async_context(streamable_http_client(server.url, http_client=client))
            session = await stack.enter_async_context(ClientSession(streams[0], streams[1], read_timeout_seconds=self.timeout_s))
            await asyncio.wait_for(session.initialize(), self.timeout_s)
            listed = await asyncio.wait_for(session.list_tools(), self.timeout_s)
        except ToolSetupError:
            raise
        except BaseException as exc:  # anyio wraps transport failures in exception groups
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ToolSetupError(f"cannot use MCP server {server.name!r}: {_describe(exc)}") from None
        config = server.tool_configuration
        if not config.enabled:
            return session
        allowed = set(config.allowed_tools) if config.allowed_tools is not None else None
        for t in listed.tools:
            if allowed is not None and t.name not in allowed:
                continue
            schema = dict(t.input_schema or {"type": "object"})
            props = dict(schema.get("properties") or {})
            wants_context = CONTEXT_ARG in props
            if wants_context:
                props.pop(CONTEXT_ARG)
                schema["properties"] = props
                schema["required"] = [r for r in schema.get("required", []) if r != CONTEXT_ARG]
            schema.setdefault("type", "object")
            name = t.name if t.name not in self.reserved and t.name not in self.tools else f"{server.name}__{t.name}"
            self.tools[name] = RemoteTool(server.name, t.name, Tool(name=name, description=t.description, input_schema=schema), wants_context)
        return session

    async def _call(self, session: Any, tool: RemoteTool, arguments: dict[str, Any], fut: asyncio.Future[tuple[str, bool]]) -> None:
        try:
            result = await asyncio.wait_for(session.call_tool(tool.remote_name, arguments), self.timeout_s)
            outcome = _result_text(result)
        except asyncio.TimeoutError:
            outcome = (f"tool {tool.spec.name} timed out after {self.timeout_s:g} s", True)
        except Exception as exc:  # the model sees the failure; the run goes on
            outcome = (f"tool {tool.spec.name} failed: {_describe(exc)}", True)
        if not fut.done():
            fut.set_result(outcome)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    leaf = _first_leaf(exc)
    return f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
