"""Reading a chat request body: JSON, depth, the pydantic model, then the limits and checks that need settings.

Every problem is a 422 naming its field (`Invalid`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from ..api_models import ChatRequest, McpServer
from ..config import Settings
from ..egress import EgressDenied, check_url
from ..errors import Invalid, pydantic_details
from ..json_schemas import check_json_depth, check_request_schema

Translate = Callable[[dict[str, Any]], dict[str, Any]]


async def read_chat_request(request: Request, settings: Settings, translate: Translate | None = None) -> ChatRequest:
    """Parse and validate a chat body; every problem is a 422 naming its field.

    `translate` turns a wire dialect's body into a native one before validation.
    """
    raw = await request.body()
    if not raw.strip():
        raise Invalid("a JSON request body is required", "body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"request body is not valid JSON: {exc}", "body") from None
    if not isinstance(data, dict):
        raise Invalid("request body must be a JSON object", "body")
    check_json_depth(data, settings.limits.max_json_depth, raw)  # before anything recursive walks it
    if translate is not None:
        data = translate(data)
    try:
        chat = ChatRequest.model_validate(data)
    except ValidationError as exc:
        details = pydantic_details(exc.errors(include_url=False))
        first = details[0]
        raise Invalid(f"invalid request: {first['field']}: {first['message']}", details=details) from None
    limits = settings.limits
    if len(chat.messages) > limits.max_messages:
        raise Invalid(f"at most {limits.max_messages} messages are allowed", "messages")
    if chat.tools and len(chat.tools) > limits.max_tools:
        raise Invalid(f"at most {limits.max_tools} tools are allowed", "tools")
    for i, tool in enumerate(chat.tools or ()):
        if len(orjson.dumps(tool.input_schema)) > limits.max_schema_bytes:
            raise Invalid(f"input_schema exceeds {limits.max_schema_bytes} bytes of JSON", f"tools.{i}.input_schema")
        check_request_schema(tool.input_schema, f"tools.{i}.input_schema")
    if chat.output_format is not None:
        field = _output_schema_field(data)
        if len(orjson.dumps(chat.output_format.schema_)) > limits.max_schema_bytes:
            raise Invalid(f"the output schema exceeds {limits.max_schema_bytes} bytes of JSON", field)
        check_request_schema(chat.output_format.schema_, field)
    await _check_server_side(chat, settings)
    if len(raw) > limits.max_text_chars and sum(_text_chars(m.content) for m in chat.messages) > limits.max_text_chars:
        raise Invalid(f"message content exceeds {limits.max_text_chars} characters", "messages")
    return chat


async def _check_server_side(chat: ChatRequest, settings: Settings) -> None:
    """What the gateway itself will do for the request: context management, built-in tools, MCP servers."""
    if chat.context_management is not None:
        from ..builtin_tools.context_window import check as check_context_management

        problem = check_context_management(chat.context_management)
        if problem is not None:
            raise Invalid(problem, "context_management")
    if chat.builtin_tools:
        from ..builtin_tools.registry import check_request  # each tool's own checks (allow-lists, settings)

        check_request(chat, settings)
    if chat.mcp_servers:
        chat.mcp_servers = [await _resolve_mcp_server(i, s, settings) for i, s in enumerate(chat.mcp_servers)]


def _output_schema_field(data: dict[str, Any]) -> str:
    """Where the request put its output schema: output_config, or the deprecated response_format."""
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_schema", "json_object"):
        return (
            "response_format.schema"
            if response_format.get("schema") is not None
            else "response_format.json_schema.schema"
        )
    return "output_config.format.schema"


async def _resolve_mcp_server(i: int, server: McpServer, settings: Settings) -> McpServer:
    """A request's MCP server: its own URL (checked against the egress rules) or a configured one by name."""
    if server.url is None:
        configured = next((c for c in settings.mcp_servers if c.name == server.name), None)
        if configured is None:
            known = ", ".join(c.name for c in settings.mcp_servers) or "none"
            raise Invalid(
                f"mcp_servers.{i} has no url and no configured MCP server is named {server.name!r} (configured: {known})",
                f"mcp_servers.{i}.url",
            )
        tools = server.tool_configuration
        if configured.allowed_tools is not None:
            allowed = [t for t in (tools.allowed_tools or configured.allowed_tools) if t in configured.allowed_tools]
            tools = tools.model_copy(update={"allowed_tools": allowed})
        # It stays a name: the run looks up its URL and token (tools.ToolBox), so the stored request holds no
        # operator secret. Configured servers are the operator's choice, so they skip the egress rules.
        return server.model_copy(update={"tool_configuration": tools})
    try:
        await check_url(server.url, settings.egress)  # before anything connects to it
    except EgressDenied as exc:
        raise Invalid(f"MCP server {server.name!r} is not allowed: {exc}", f"mcp_servers.{i}.url") from None
    return server


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(getattr(b, "text", "") or "") for b in content)
