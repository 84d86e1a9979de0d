"""The API's request and response models: the chat request body shared by `POST /v1/messages`
and `POST /v1/messages/async`, and the bodies the endpoints answer with.

Everything a client sends is validated here, once, so the providers and the run
loop can trust it. Unknown top-level fields are rejected: a typo such as
`max_token` must not silently change behaviour.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # fullmatch only: `$` accepts a trailing newline


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- content blocks -------------------------------------------------------------


class Base64Source(_Strict):
    type: Literal["base64"]
    media_type: str = Field(min_length=1, max_length=128)
    data: str = Field(min_length=1)


class UrlSource(_Strict):
    type: Literal["url"]
    url: str = Field(min_length=1, max_length=8192)


class TextSource(_Strict):
    type: Literal["text"]
    media_type: str = "text/plain"
    data: str


ImageSource = Annotated[Base64Source | UrlSource, Field(discriminator="type")]
DocumentSource = Annotated[Base64Source | UrlSource | TextSource, Field(discriminator="type")]


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[dict[str, Any]] | None = None


class ImageBlock(_Strict):
    type: Literal["image"]
    source: ImageSource
    cache_control: dict[str, Any] | None = None


class DocumentBlock(_Strict):
    type: Literal["document"]
    source: DocumentSource
    title: str | None = None
    context: str | None = None
    citations: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None


class ToolUseBlock(_Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    input: dict[str, Any] = {}
    cache_control: dict[str, Any] | None = None


ToolResultContent = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[ToolResultContent] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))


class ThinkingBlock(_Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Strict):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Strict):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]

    def blocks(self) -> list[Any]:
        """Content as a list of blocks (a plain string becomes one text block)."""
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return self.content


# --- system, tools, options --------------------------------------------------------


class System(_Strict):
    text: str
    # The seed's configuration object ({"enabled": true}: cite built-in search results), or a list of citations.
    citations: dict[str, Any] | list[dict[str, Any]] | None = None
    # Anthropic-style system blocks carry these; accepted so such clients work unchanged.
    type: Literal["text"] | None = None
    cache_control: dict[str, Any] | None = None


class Tool(_Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.fullmatch(v):
            raise ValueError("tool names are 1-64 characters of letters, digits, '_' and '-'")
        return v

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type") != "object":
            raise ValueError('input_schema must be a JSON Schema with "type": "object"')
        return v


BuiltinToolType = Literal[
    "semantic_search_v1",
    "database_query_v1",
    "web_fetch_v1",
    "web_search_v1",
    "skill_list_v1",
    "skill_load_v1",
    "skill_unload_v1",
    "code_execution_v1",
]
BUILTIN_TOOL_TYPES: tuple[str, ...] = get_args(BuiltinToolType)


class BuiltinTool(_Strict):
    """A tool the server runs itself, asked for in `tools` by `type`; the model sees it as `name` (default: the type)."""

    type: BuiltinToolType
    name: str | None = None
    description: str | None = Field(None, max_length=4096)  # replaces the built-in description
    cache_control: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _TOOL_NAME.fullmatch(v):
            raise ValueError("tool names are 1-64 characters of letters, digits, '_' and '-'")
        return v

    @property
    def tool_name(self) -> str:
        return self.name or self.type


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError('tool_choice of type "tool" needs a "name"')
        if self.type != "tool" and self.name is not None:
            raise ValueError('tool_choice "name" is only allowed with type "tool"')
        return self


class ThinkingEnabled(_Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1)


class ThinkingDisabled(_Strict):
    type: Literal["disabled"]


class ThinkingEffort(_Strict):
    enabled: bool
    effort: Literal["low", "medium", "high"] = "medium"


Thinking = ThinkingEnabled | ThinkingDisabled | ThinkingEffort


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")
    name: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutputConfig(_Strict):
    format: JsonSchemaFormat | None = None
    effort: Literal["low", "medium", "high"] | None = None


class ResponseFormat(BaseModel):
    """Deprecated OpenAI-style `response_format`; only `text` and `json_schema` mean anything."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_schema", "json_object"]
    json_schema: dict[str, Any] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")

    def to_format(self) -> JsonSchemaFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return JsonSchemaFormat.model_validate({"type": "json_schema", "schema": {"type": "object"}})
        schema = self.schema_ or (self.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return JsonSchemaFormat.model_validate(
            {"type": "json_schema", "schema": schema, "name": (self.json_schema or {}).get("name")}
        )


class ToolConfiguration(_Strict):
    enabled: bool = True
    allowed_tools: list[str] | None = None


class McpServer(_Strict):
    name: str = Field(min_length=1, max_length=128)
    url: str | None = Field(None, min_length=1, max_length=2048)  # absent: the server of that name in the config
    type: Literal["url"] | None = None
    authorization_token: str | None = Field(None, max_length=8192, repr=False)
    tool_configuration: ToolConfiguration = ToolConfiguration()


class CacheControl(_Strict):
    type: Literal["ephemeral"]
    ttl: str | None = None


# --- the request ------------------------------------------------------------------


class ChatRequest(_Strict):
    """A chat request. `system` is normalised to a list of `System` objects."""

    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(None, max_length=256)
    system: list[System] | None = None
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop_sequences: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=16)
    tools: list[Tool] | None = None
    # Built-in tools: moved here out of `tools` (entries with a built-in `type`) when the request is read.
    builtin_tools: list[BuiltinTool] | None = None
    tool_choice: ToolChoice | None = None
    tool_context: list[Any] | dict[str, Any] | None = None
    mcp_servers: list[McpServer] | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    response_format: ResponseFormat | None = None
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    metadata: dict[str, str] | None = None
    correlation_id: str | None = Field(None, max_length=256)
    service_tier: str | None = Field(None, max_length=64)
    inference_geo: str | None = Field(None, max_length=64)
    container: str | dict[str, Any] | None = None
    cache_control: CacheControl | None = None
    context_management: dict[str, Any] | None = None
    maximum_loaded_skills: int | None = Field(None, ge=1)
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _split_builtin_tools(cls, data: Any) -> Any:
        """`tools` entries whose `type` names a built-in tool become `builtin_tools`; the rest stay function tools."""
        if not isinstance(data, dict) or not isinstance(data.get("tools"), list):
            return data
        tools = data["tools"]
        builtin = [t for t in tools if isinstance(t, dict) and t.get("type") in BUILTIN_TOOL_TYPES]
        if not builtin:
            return data
        rest = [t for t in tools if not (isinstance(t, dict) and t.get("type") in BUILTIN_TOOL_TYPES)]
        return {**data, "tools": rest or None, "builtin_tools": [*(data.get("builtin_tools") or ()), *builtin]}

    @field_validator("system", mode="before")
    @classmethod
    def _normalise_system(cls, v: Any) -> Any:
        if v is None:
            return None
        items = v if isinstance(v, list) else [v]
        return [{"text": item} if isinstance(item, str) else item for item in items]

    @field_validator("priority", mode="before")
    @classmethod
    def _priority_null(cls, v: Any) -> Any:
        return 0 if v is None else v

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[Tool] | None) -> list[Tool] | None:
        seen: set[str] = set()
        for t in tools or ():
            if t.name in seen:
                raise ValueError(f"tool name {t.name!r} is used more than once")
            seen.add(t.name)
        return tools

    def _check_builtin_names(self) -> None:
        seen = {t.name for t in self.tools or ()}
        for i, t in enumerate(self.builtin_tools or ()):
            if t.tool_name in seen:
                raise _field_error(f"builtin_tools.{i}.name", f"tool name {t.tool_name!r} is used more than once")
            seen.add(t.tool_name)

    def uses_builtin(self, tool_type: str) -> bool:
        return any(t.type == tool_type for t in self.builtin_tools or ())

    @property
    def has_server_tools(self) -> bool:
        """Whether the server runs tools itself in this request (MCP servers or built-in tools)."""
        return bool(self.mcp_servers or self.builtin_tools)

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        self._fold_system_messages()
        self._check_tool_turns()
        self._check_builtin_names()
        if (
            self.tool_choice
            and self.tool_choice.type in ("any", "tool")
            and not self.tools
            and not self.has_server_tools
        ):
            raise _field_error("tool_choice", f'tool_choice "{self.tool_choice.type}" needs tools')
        if self.tool_choice and self.tool_choice.type == "tool":
            names = {t.name for t in self.tools or ()}
            names |= {t.tool_name for t in self.builtin_tools or ()}
            if self.tool_choice.name not in names and not self.mcp_servers:
                raise _field_error(
                    "tool_choice.name", f"tool_choice names {self.tool_choice.name!r}, which is not in tools"
                )
        if self.response_format is not None:
            try:
                fmt = self.response_format.to_format()
            except ValueError as exc:
                raise _field_error("response_format", str(exc)) from None
            if fmt is not None:
                if self.output_config and self.output_config.format:
                    raise _field_error("response_format", "give output_config.format or response_format, not both")
                self.output_config = (
                    OutputConfig(format=fmt)
                    if not self.output_config
                    else self.output_config.model_copy(update={"format": fmt})
                )
        if self.output_format is not None and (self.tools or self.has_server_tools):
            raise _field_error("output_config.format", "structured output cannot be combined with tools")
        return self

    def _fold_system_messages(self) -> None:
        system_msgs = [m for m in self.messages if m.role == "system"]
        if not system_msgs:
            return
        folded = list(self.system or [])
        for m in system_msgs:
            for b in m.blocks():
                if not isinstance(b, TextBlock):
                    raise _field_error("messages", "a system message may only hold text")
                folded.append(System(text=b.text))
        self.system = folded
        self.messages = [m for m in self.messages if m.role != "system"]
        if not self.messages:
            raise _field_error("messages", "messages needs at least one user or assistant message")

    def _check_tool_turns(self) -> None:
        seen_ids: set[str] = set()
        previous_tool_ids: set[str] = set()
        for i, m in enumerate(self.messages):
            current_ids: set[str] = set()
            for j, b in enumerate(m.blocks()):
                where = f"messages.{i}.content.{j}"
                if isinstance(b, ToolUseBlock):
                    if m.role != "assistant":
                        raise _field_error(where, "tool_use blocks belong to assistant messages")
                    if b.id in seen_ids:
                        raise _field_error(f"{where}.id", f"tool_use id {b.id!r} is used more than once")
                    seen_ids.add(b.id)
                    current_ids.add(b.id)
                elif isinstance(b, ToolResultBlock):
                    if m.role != "user":
                        raise _field_error(where, "tool_result blocks belong to user messages")
                    if b.tool_use_id not in previous_tool_ids:
                        raise _field_error(
                            f"{where}.tool_use_id",
                            f"tool_use_id {b.tool_use_id!r} does not match a tool_use of the previous assistant message",
                        )
                elif isinstance(b, (ThinkingBlock, RedactedThinkingBlock)) and m.role != "assistant":
                    raise _field_error(where, "thinking blocks belong to assistant messages")
            previous_tool_ids = current_ids if m.role == "assistant" else set()

    @property
    def output_format(self) -> JsonSchemaFormat | None:
        return self.output_config.format if self.output_config else None

    @property
    def system_text(self) -> str:
        return "\n\n".join(s.text for s in self.system or ())


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _field_error(field: str, message: str) -> _FieldError:
    return _FieldError(field, message)


# --- responses (for the OpenAPI document) -----------------------------------------


class ErrorInfo(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
    request_id: str


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cache_write_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    thought_tokens: int | None = None


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    provider: str
    content: list[dict[str, Any]]
    finish_reason: str
    usage: Usage
    citations: list[dict[str, Any]] | None = None


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    provider: str
    aliases: list[str]
    default: bool
    max_concurrency: int | None  # null: no limit
    # What the OpenAI and Anthropic SDKs' model lists read (`created` in Unix seconds, `created_at` the same in RFC 3339).
    created: int
    owned_by: str = "backstream"
    type: Literal["model"] = "model"
    display_name: str
    created_at: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]
    # Anthropic's page fields: the whole table is one page.
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class AsyncStarted(BaseModel):
    message_id: str
    status: str = "pending"
    message: str = "Request initiated successfully"


class StreamMetadata(BaseModel, extra="allow"):
    model: str | None = None
    provider: str | None = None
    priority: int = 0
    correlation_id: str | None = None
    event_count: int = 0
    usage: dict[str, Any] | None = None


class StreamStatus(BaseModel):
    message_id: str
    status: str
    created_at: str
    updated_at: str
    completed_at: str | None
    error_message: str | None
    stream_type: str = "chat_completion"
    metadata: StreamMetadata


class RunList(BaseModel):
    """One page of a tenant's runs, newest first; pass `next_cursor` back as `cursor` for the next (null: the last)."""

    data: list[StreamStatus]
    next_cursor: str | None


class Cancelled(BaseModel):
    message: str = "Stream cancelled successfully"
    message_id: str


class RunResult(BaseModel):
    """A background run folded into one message (as `POST /v1/messages` answers), plus its status."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str | None
    provider: str
    content: list[dict[str, Any]]
    finish_reason: str | None  # null while the run is active
    usage: Usage
    citations: list[dict[str, Any]] | None = None
    warnings: list[str] | None = None
    error: dict[str, Any] | None = None
    status: str
