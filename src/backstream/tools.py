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
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2
import orjson

from . import tracing
from .api_models import McpServer, Tool
from .builtin_tools.base import ToolSetupError
from .config import EgressSettings, McpServerConfig
from .egress import PinnedTransport, check_url_shape

log = logging.getLogger("backstream.tools")
CONTEXT_ARG = "tool_context"  # a tool whose input schema has this property receives the request's tool_context


@dataclass
class RemoteTool:
    """One tool of an MCP server, under the name the model sees."""

    server: str
    remote_name: str
    spec: Tool
    wants_context: bool


def _result_text(result: Any) -> tuple[str, bool]:
    parts = []
    for item in getattr(result, "content", None) or ():
        text = getattr(item, "text", None)
        parts.append(
            text if text is not None else orjson.dumps(item.model_dump(mode="json", exclude_none=True)).decode()
        )
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(orjson.dumps(result.structured_content).decode())
    return "".join(parts), bool(getattr(result, "is_error", False))


class ToolBox:
    """A run's MCP servers: connected once, their tools offered to the model, calls run with a timeout."""

    def __init__(self, servers: list[McpServer], tool_context: Any, options: Any, reserved_names: set[str]) -> None:
        self.servers = servers
        self.tool_context = tool_context
        self.egress: EgressSettings = options.egress
        self.configured: dict[str, McpServerConfig] = options.configured_mcp
        self.timeout_s: float = options.tool_timeout_s
        self.setup_timeout_s: float = options.tool_setup_timeout_s
        self.reserved = reserved_names
        self.tools: dict[str, RemoteTool] = {}
        self._calls: asyncio.Queue[Any] = asyncio.Queue()
        self._ready: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._connecting = "?"  # the server being set up, for the deadline's message
        self.trace_headers: dict[str, str] | None = None  # traceparent of the current tool call (tracing on)

    @property
    def specs(self) -> list[Tool]:
        return [t.spec for t in self.tools.values()]

    def owns(self, name: str) -> bool:
        return name in self.tools

    async def start(self) -> None:
        """Connect, initialise and list tools of every server, all within runs.tool_setup_timeout_s."""
        self._ready = asyncio.get_running_loop().create_future()
        self._worker = asyncio.create_task(self._serve(), name="mcp-tools")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.setup_timeout_s)
        except TimeoutError:
            await self.aclose()
            if self._ready.done() and not self._ready.cancelled():
                self._ready.exception()  # a failure that raced the deadline: the deadline is the answer
            raise ToolSetupError(
                f"MCP server {self._connecting!r} was not ready within {self.setup_timeout_s:g} s "
                "(connecting, initialising and listing tools; runs.tool_setup_timeout_s)"
            ) from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        worker = self._worker
        if worker is None or worker.done():
            return
        try:
            ready = self._ready
            if ready is not None and ready.done() and not ready.cancelled() and ready.exception() is None:
                self._calls.put_nowait(None)  # in service: let it close its sessions in order
                done, _ = await asyncio.wait({worker}, timeout=5)
                if done:
                    return
            worker.cancel()  # still setting up (or stuck closing): a stuck server must not hold the run
            await asyncio.wait({worker}, timeout=5)
        except asyncio.CancelledError:
            worker.cancel()
            raise

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
        try:
            async with contextlib.AsyncExitStack() as stack:
                sessions = {}
                for server in self.servers:
                    self._connecting = server.name
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
            if isinstance(exc, asyncio.CancelledError):
                self._ready.cancel()
                raise
            if not self._ready.done():
                failure = _first_leaf(exc)
                if not isinstance(failure, ToolSetupError):
                    failure = ToolSetupError(f"cannot use MCP server {self._connecting!r}: {_describe(exc)}")
                self._ready.set_exception(failure)

    def _endpoint(self, server: McpServer) -> tuple[str, str | None, bool]:
        """(url, token, trusted): a configured server (no url in the request) is looked up now, so its token is never stored."""
        if server.url is not None:
            return server.url, server.authorization_token, False
        configured = self.configured.get(server.name)
        if configured is None:
            raise ToolSetupError(f"MCP server {server.name!r} is no longer configured (mcp_servers)")
        env = configured.authorization_token_env
        token = server.authorization_token or (os.environ.get(env) if env else None) or None
        return configured.url, token, True

    def _client(self, url: str, headers: dict[str, str], timeout: Any, auth: Any, trusted: bool) -> httpx2.AsyncClient:
        """An httpx2 client for one MCP server: pinned and checked unless the operator configured the server."""
        egress = self.egress
        hooks: dict[str, list[Any]] = {"request": [], "response": []}
        if tracing.TRACER is not None:

            async def propagate(request: httpx2.Request) -> None:  # the tool call's trace, else the run's
                request.headers.update(self.trace_headers or {})

            hooks["request"].append(propagate)
        if url.rstrip("/").endswith("/sse"):
            hooks["response"].append(_guard_sse_endpoint)
        if trusted:
            return httpx2.AsyncClient(headers=headers, timeout=timeout, auth=auth, event_hooks=hooks)

        async def check(request: httpx2.Request) -> None:  # every request, redirects included; addresses at connect
            check_url_shape(str(request.url), egress)

        hooks["request"].append(check)
        return httpx2.AsyncClient(
            headers=headers, timeout=timeout, auth=auth, event_hooks=hooks, transport=PinnedTransport(egress)
        )

    async def _connect(self, stack: contextlib.AsyncExitStack, server: McpServer) -> Any:
        from mcp import ClientSession
        from mcp.client.sse import sse_client
        from mcp.client.streamable_http import streamable_http_client

        url, token, trusted = self._endpoint(server)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            if url.rstrip("/").endswith("/sse"):

                def factory(
                    headers: dict[str, Any] | None = None, timeout: Any = None, auth: Any = None
                ) -> httpx2.AsyncClient:
                    return self._client(url, headers or {}, timeout, auth, trusted)

                streams = await stack.enter_async_context(
                    sse_client(url, headers=headers, timeout=self.timeout_s, httpx_client_factory=factory)
                )
            else:
                client = await stack.enter_async_context(
                    self._client(url, headers, httpx2.Timeout(self.timeout_s, read=300), None, trusted)
                )
                streams = await stack.enter_async_context(streamable_http_client(url, http_client=client))
            session = await stack.enter_async_context(
                ClientSession(streams[0], streams[1], read_timeout_seconds=self.timeout_s)
            )
            await asyncio.wait_for(session.initialize(), self.timeout_s)
            listed = await asyncio.wait_for(session.list_tools(), self.timeout_s)
        except BaseException as exc:  # anyio wraps transport failures in exception groups
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ToolSetupError(f"cannot use MCP server {server.name!r}: {_describe(exc)}") from None
        self._register(server, listed.tools)
        return session

    def _register(self, server: McpServer, listed: list[Any]) -> None:
        config = server.tool_configuration
        if not config.enabled:
            return
        allowed = set(config.allowed_tools) if config.allowed_tools is not None else None
        configured = self.configured.get(server.name) if server.url is None else None
        if (
            configured is not None and configured.allowed_tools is not None
        ):  # the config may have changed since the request
            allowed = set(configured.allowed_tools) if allowed is None else allowed & set(configured.allowed_tools)
        for t in listed:
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
            self.tools[name] = RemoteTool(
                server.name, t.name, Tool(name=name, description=t.description, input_schema=schema), wants_context
            )

    async def _call(
        self, session: Any, tool: RemoteTool, arguments: dict[str, Any], fut: asyncio.Future[tuple[str, bool]]
    ) -> None:
        try:
            result = await asyncio.wait_for(session.call_tool(tool.remote_name, arguments), self.timeout_s)
            outcome = _result_text(result)
        except TimeoutError:
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


# --- the SSE endpoint event ----------------------------------------------------------
MAX_ENDPOINT_SCAN = 1 << 20  # an endpoint event comes first; stop looking after this many bytes


async def _guard_sse_endpoint(response: httpx2.Response) -> None:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        response.stream = _EndpointGuard(response.stream, str(response.request.url))


class _EndpointGuard(httpx2.AsyncByteStream):
    """An SSE body, failing at once on an `endpoint` event that names another origin.

    The SDK refuses such an endpoint too, but hands the error to a stream nobody reads
    until the endpoint is known, so the setup waited forever. SSEError is the one
    failure its reader passes straight up.
    """

    def __init__(self, inner: Any, url: str) -> None:
        self.inner = inner
        self.url = url
        self.partial = b""
        self.event = b""
        self.data: list[bytes] = []
        self.scanned = 0
        self.done = False

    async def __aiter__(self) -> Any:
        async for chunk in self.inner:
            if not self.done:
                self._scan(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _scan(self, chunk: bytes) -> None:
        self.scanned += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if line:
                field, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if field == b"event":
                    self.event = value
                elif field == b"data":
                    self.data.append(value)
                continue
            if self.event == b"endpoint" and self.data:
                self._check(b"\n".join(self.data).decode("utf-8", "replace"))
                self.done = True
                return
            self.event, self.data = b"", []
        if self.scanned > MAX_ENDPOINT_SCAN:
            self.done = True

    def _check(self, endpoint: str) -> None:
        own, target = urlsplit(self.url), urlsplit(urljoin(self.url, endpoint))
        if (own.scheme, own.netloc) != (target.scheme, target.netloc):
            raise httpx2.SSEError(
                f"the SSE endpoint event names another origin ({target.scheme}://{target.netloc}); refused"
            )


def redact_stored_request(raw: bytes) -> bytes:
    """A stored request without the secrets it carried (for a run that can no longer start again):
    MCP tokens, and the passwords in database_query_v1 connection strings."""
    if b"authorization_token" not in raw and b"sql_database" not in raw:
        return raw
    data = orjson.loads(raw)
    for server in data.get("mcp_servers") or ():
        if isinstance(server, dict):
            server.pop("authorization_token", None)
    if b"sql_database" in raw:
        from .builtin_tools.base import artifacts
        from .builtin_tools.database import redact

        for _, item in artifacts(data.get("tool_context")):
            secret = item.get("connection_string") if isinstance(item, dict) else None
            if isinstance(secret, str) and item.get("type") == "sql_database":
                item["connection_string"] = redact(secret)
    return orjson.dumps(data)
