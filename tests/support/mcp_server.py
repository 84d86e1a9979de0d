"""A real MCP server for the tests, built with the official `mcp` SDK, served by uvicorn on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer

from tests.support.server import free_port


def build_server() -> MCPServer:
    server = MCPServer("backstream-test-tools")

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> str:
        return str(a + b)

    @server.tool(description="Always fails.")
    def fail(reason: str = "broken") -> str:
        raise RuntimeError(f"the tool broke: {reason}")

    @server.tool(description="Sleeps, then answers.")
    async def slow(seconds: float = 5.0) -> str:
        await asyncio.sleep(seconds)
        return "finally"

    @server.tool(description="Looks something up in the request's context.")
    def lookup(query: str, tool_context: Any = None) -> str:
        return f"{query}: {tool_context!r}"

    return server


class McpHttpServer:
    """Streamable HTTP at /mcp and SSE at /sse, on their own ports; records Authorization and traceparent headers."""

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        self.traceparents: list[str | None] = []
        self.http_port = free_port()
        self.sse_port = free_port()
        self._servers: list[uvicorn.Server] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/mcp"

    @property
    def sse_url(self) -> str:
        return f"http://127.0.0.1:{self.sse_port}/sse"

    def _recording(self, app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                self.authorizations.append(headers.get(b"authorization", b"").decode() or None)
                self.traceparents.append(headers.get(b"traceparent", b"").decode() or None)
            await app(scope, receive, send)

        return wrapped

    def start(self) -> McpHttpServer:
        for app, port in (
            (build_server().streamable_http_app(), self.http_port),
            (build_server().sse_app(), self.sse_port),
        ):
            config = uvicorn.Config(
                self._recording(app), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        deadline = time.monotonic() + 10
        while not all(s.started for s in self._servers):
            if time.monotonic() > deadline:
                raise RuntimeError("MCP test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.should_exit = True
        for t in self._threads:
            t.join(5)
