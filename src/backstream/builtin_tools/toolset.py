"""`ServerTools`: a run's built-in tools and MCP servers behind one interface."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..api_models import ChatRequest, System, Tool
from .base import BuiltinTool, ToolEnv, ToolOutcome, ToolSetupError
from .registry import create

if TYPE_CHECKING:
    from ..engine import RunOptions
    from ..model_table import ModelTable
    from ..tools import ToolBox

log = logging.getLogger("backstream.tools")


class ServerTools:
    """The tools the server runs for one run: offered to the model, called between steps."""

    def __init__(
        self,
        request: ChatRequest,
        options: RunOptions,
        models: ModelTable | None,
        mcp: ToolBox | None,
        tenant: str = "default",
    ):
        self.env = ToolEnv(request, options.tools, options.egress, options.data_dir, tenant, models)
        self.mcp = mcp
        self.builtin: dict[str, BuiltinTool] = {}  # the name the model sees -> the tool
        # A backstop only: each tool enforces its own, shorter limits.
        self.timeout_s = max(options.tool_timeout_s, options.tools.code_execution.timeout_s + 5)

    async def start(self) -> None:
        """Set up every built-in tool (documents parsed, connections checked), then the MCP servers."""
        try:
            for spec in self.env.request.builtin_tools or ():
                tool = create(spec.type)
                self.builtin[spec.tool_name] = tool
                if spec.description:
                    tool.description = spec.description
                try:
                    await tool.start(self.env)
                except ToolSetupError:
                    raise
                except Exception as exc:  # e.g. a document that cannot be parsed: the run fails, saying why
                    raise ToolSetupError(f"built-in tool {spec.tool_name!r} cannot start: {exc}") from None
            if self.mcp is not None:
                await self.mcp.start()
        except BaseException:
            await self.aclose()
            raise

    @property
    def specs(self) -> list[Tool]:
        own = [Tool(name=n, description=t.description, input_schema=t.input_schema) for n, t in self.builtin.items()]
        return [*own, *(self.mcp.specs if self.mcp is not None else ())]

    def owns(self, name: str) -> bool:
        return name in self.builtin or (self.mcp is not None and self.mcp.owns(name))

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Run a tool; a failure or timeout is an error result for the model, never the run's end."""
        tool = self.builtin.get(name)
        if tool is None:
            assert self.mcp is not None
            content, is_error = await self.mcp.call(name, arguments)
            return ToolOutcome(content, is_error)
        try:
            return await asyncio.wait_for(tool.call(arguments, self.env), self.timeout_s)
        except TimeoutError:
            return ToolOutcome(f"tool {name} timed out after {self.timeout_s:g} s", True)
        except Exception as exc:
            log.exception("built-in tool %s failed", name)
            return ToolOutcome(f"tool {name} failed: {type(exc).__name__}: {exc}", True)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request of the next model call: the system prompt with what tools added (loaded skills)."""
        additions = [System(text=text) for text in self.env.system_additions.values()]
        if not additions:
            return request
        return request.model_copy(update={"system": [*(request.system or ()), *additions]})

    def cite(self, text: str) -> list[dict[str, Any]] | None:
        """Citations of a finished text block: the search results it draws on, when citations are enabled."""
        from .citations import cite

        return cite(text, self.env)

    @property
    def tracing_target(self) -> ToolBox | None:
        return self.mcp

    async def aclose(self) -> None:
        for tool in self.builtin.values():
            try:
                await tool.aclose()
            except Exception:
                log.exception("closing a built-in tool failed")
        if self.mcp is not None:
            await self.mcp.aclose()
