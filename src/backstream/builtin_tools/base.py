"""What every built-in tool is: a description and schema for the model, and `call`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..api_models import ChatRequest
    from ..config import EgressSettings, ToolsSettings
    from ..model_table import ModelTable


class ToolSetupError(Exception):
    """A run's server-side tools could not be set up (an MCP server unreachable, a database that will not open)."""


def artifacts(tool_context: Any) -> Iterator[tuple[str, Any]]:
    """(field path, item) of every artifact in `tool_context`: a list of them, one on its own, or a dict
    whose values are artifacts or lists of them (`{"documents": [...], "databases": [...]}`)."""
    if isinstance(tool_context, list):
        for i, item in enumerate(tool_context):
            yield f"tool_context.{i}", item
    elif isinstance(tool_context, dict):
        if "type" in tool_context:  # one artifact on its own
            yield "tool_context", tool_context
            return
        for key, value in tool_context.items():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    yield f"tool_context.{key}.{i}", item
            else:
                yield f"tool_context.{key}", value


@dataclass
class ToolOutcome:
    """A tool call's answer: the text the model sees, and fields added to the `tool_result` event."""

    content: str
    is_error: bool = False
    extra: dict[str, Any] | None = None  # e.g. {"skills": {"loaded": [...], "evicted": [...]}}


@dataclass
class Source:
    """A passage a tool handed to the model, which a cited answer may point at."""

    document_index: int
    title: str | None
    text: str
    start: int = 0  # character offsets of `text` in its document
    end: int = 0


@dataclass
class ToolEnv:
    """What built-in tools share during one run: the request, settings, and run-scoped state."""

    request: ChatRequest
    settings: ToolsSettings
    egress: EgressSettings
    data_dir: str
    tenant: str = "default"  # whose run: per-tenant state (container directories) is kept apart
    models: ModelTable | None = None  # embedding models are looked up here
    sources: list[Source] = field(default_factory=list)  # search results so far, numbered from 1 for the model
    system_additions: dict[str, str] = field(default_factory=dict)  # key -> text joined to the system prompt
    state: dict[str, Any] = field(default_factory=dict)  # per-tool run state, keyed by the tool's type


class BuiltinTool(Protocol):
    """One built-in tool type. `start` runs once per run before the first model call (may be a no-op)."""

    description: str
    input_schema: dict[str, Any]

    async def start(self, env: ToolEnv) -> None: ...

    async def call(self, arguments: dict[str, Any], env: ToolEnv) -> ToolOutcome: ...

    async def aclose(self) -> None: ...
