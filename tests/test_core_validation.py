"""Request validation in-process: the chat body as the HTTP edge reads it (http/chat_body.read_chat_request,
given the raw bytes), and the rules of api_models.ChatRequest. Each refusal is an `Invalid` (a 422 at the
edge) naming its field; tests/test_schema.py keeps one over-HTTP case per kind for the status and shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from backstream.api_models import ChatRequest, System
from backstream.config import Settings, load_settings
from backstream.errors import Invalid
from backstream.http.chat_body import read_chat_request
from backstream.model_table import ModelTable

USER = [{"role": "user", "content": "hi"}]
SETTINGS = load_settings(environ={})
TOOL = {
    "name": "weather",
    "description": "w",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALL = {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}
ASSISTANT_CALL = {"role": "assistant", "content": [CALL]}


def result(tool_use_id: str = "call_1", content: Any = "sunny") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": content}]}


def body(**over: Any) -> dict[str, Any]:
    return {"model": "gpt", "max_tokens": 8, "messages": USER, **over}


class RawBody:
    """What read_chat_request needs of a starlette Request: the body bytes."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def body(self) -> bytes:
        return self.raw


async def parse(payload: Any, settings: Settings = SETTINGS) -> ChatRequest:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return await read_chat_request(RawBody(raw), settings)  # type: ignore[arg-type]


async def refused(payload: Any, settings: Settings = SETTINGS) -> Invalid:
    with pytest.raises(Invalid) as caught:
        await parse(payload, settings)
    err = caught.value
    assert err.type == "invalid_request_error" and err.details, err
    assert err.message
    return err


def fields(err: Invalid) -> list[str]:
    return [d["field"] for d in err.details or ()]


def names(err: Invalid, field: str) -> bool:
    return any(f == field or f.startswith(field + ".") for f in fields(err))


# Moved here from tests/test_schema.py, where each started a request over HTTP; that file keeps one per kind.
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level field", body(max_token=5), "max_token"),
    ("messages missing", {"model": "gpt"}, "messages"),
    ("messages empty", body(messages=[]), "messages"),
    ("messages wrong type", body(messages="hello"), "messages"),
    ("bad role", body(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
    ("content wrong type", body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (
        "unknown block type",
        body(messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
        "messages.0.content.0",
    ),
    (
        "unknown field in a block",
        body(messages=[{"role": "user", "content": [{"type": "text", "text": "x", "colour": 1}]}]),
        "messages.0.content.0.text.colour",
    ),
    ("max_tokens wrong type", body(max_tokens="ten"), "max_tokens"),
    ("max_tokens zero", body(max_tokens=0), "max_tokens"),
    ("temperature too high", body(temperature=2.5), "temperature"),
    ("temperature negative", body(temperature=-0.1), "temperature"),
    ("top_p above 1", body(top_p=1.5), "top_p"),
    ("top_k negative", body(top_k=-1), "top_k"),
    ("min_p above 1", body(min_p=1.2), "min_p"),
    ("repetition_penalty zero", body(repetition_penalty=0), "repetition_penalty"),
    ("presence_penalty below -2", body(presence_penalty=-2.5), "presence_penalty"),
    ("frequency_penalty above 2", body(frequency_penalty=2.1), "frequency_penalty"),
    ("seed not int", body(seed="abc"), "seed"),
    ("too many stop sequences", body(stop_sequences=[f"s{i}" for i in range(17)]), "stop_sequences"),
    ("empty stop sequence", body(stop_sequences=[""]), "stop_sequences.0"),
    ("duplicate tool names", body(tools=[TOOL, TOOL]), "tools"),
    ("tool schema not object", body(tools=[{**TOOL, "input_schema": {"type": "string"}}]), "tools.0.input_schema"),
    ("bad tool name", body(tools=[{**TOOL, "name": "has space"}]), "tools.0.name"),
    ("tool name with a trailing newline", body(tools=[{**TOOL, "name": "weather\n"}]), "tools.0.name"),
    ("tool_choice unknown tool", body(tools=[TOOL], tool_choice={"type": "tool", "name": "nope"}), "tool_choice.name"),
    ("tool_choice tool without name", body(tools=[TOOL], tool_choice={"type": "tool"}), "tool_choice"),
    (
        "tool_choice name without type tool",
        body(tools=[TOOL], tool_choice={"type": "auto", "name": "weather"}),
        "tool_choice",
    ),
    ("tool_choice any without tools", body(tool_choice={"type": "any"}), "tool_choice"),
    ("tool_choice bad type", body(tools=[TOOL], tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (
        "tool_result id matches nothing",
        body(messages=[*USER, ASSISTANT_CALL, result("call_2")]),
        "messages.2.content.0.tool_use_id",
    ),
    (
        "tool_result not after its call",
        body(
            messages=[*USER, ASSISTANT_CALL, result(), {"role": "assistant", "content": "ok"}, result(content="again")]
        ),
        "messages.4.content.0.tool_use_id",
    ),
    ("tool_result without any call", body(messages=[result()]), "messages.0.content.0.tool_use_id"),
    (
        "duplicate tool_use ids",
        body(messages=[*USER, {"role": "assistant", "content": [CALL, CALL]}]),
        "messages.1.content.1.id",
    ),
    (
        "tool_use id reused in a later turn",
        body(messages=[*USER, ASSISTANT_CALL, result(), ASSISTANT_CALL]),
        "messages.3.content.0.id",
    ),
    ("tool_use in a user message", body(messages=[{"role": "user", "content": [CALL]}]), "messages.0.content.0"),
    (
        "tool_result in an assistant message",
        body(messages=[*USER, ASSISTANT_CALL, {"role": "assistant", "content": result()["content"]}]),
        "messages.2.content.0",
    ),
    (
        "thinking in a user message",
        body(messages=[{"role": "user", "content": [{"type": "thinking", "thinking": "hm"}]}]),
        "messages.0.content.0",
    ),
    ("thinking bad effort", body(thinking={"enabled": True, "effort": "extreme"}), "thinking"),
    ("thinking budget zero", body(thinking={"type": "enabled", "budget_tokens": 0}), "thinking"),
    (
        "structured output with tools",
        body(tools=[TOOL], output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        "output_config.format",
    ),
    (
        "structured output with mcp servers",
        body(
            mcp_servers=[{"name": "x", "url": "https://mcp.example.com/mcp"}], response_format={"type": "json_object"}
        ),
        "output_config.format",
    ),
    (
        "response_format json_schema without a schema",
        body(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        "response_format",
    ),
    (
        "response_format and output_config.format",
        body(
            response_format={"type": "json_object"},
            output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}},
        ),
        "response_format",
    ),
    ("metadata values must be strings", body(metadata={"user_id": 5}), "metadata.user_id"),
    ("priority not int", body(priority="high"), "priority"),
    ("mcp server without url", body(mcp_servers=[{"name": "x"}]), "mcp_servers.0.url"),
    (
        "image without source",
        body(messages=[{"role": "user", "content": [{"type": "image"}]}]),
        "messages.0.content.0.image.source",
    ),
    ("only system messages", body(messages=[{"role": "system", "content": "rules"}]), "messages"),
    (
        "a system message with an image",
        body(
            messages=[{"role": "system", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]}, *USER]
        ),
        "messages",
    ),
    (
        "invalid output schema",
        body(output_config={"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}),
        "output_config.format.schema",
    ),
]


@pytest.mark.parametrize(("name", "payload", "field"), CASES, ids=[c[0] for c in CASES])
async def test_invalid_request_names_the_field(name: str, payload: dict[str, Any], field: str) -> None:
    err = await refused(payload)
    assert names(err, field), (field, fields(err))
    assert err.message.startswith("invalid request: ") or err.message == err.details[0]["message"]  # type: ignore[index]


async def test_pydantic_details_drop_union_members_and_the_value_error_prefix() -> None:
    err = await refused(body(thinking={"type": "enabled", "budget_tokens": 0}))
    assert all(f.split(".")[0] == "thinking" and "Thinking" not in f for f in fields(err)), fields(err)
    err = await refused(body(messages=[*USER, ASSISTANT_CALL, result("call_2")]))
    assert err.details == [
        {
            "field": "messages.2.content.0.tool_use_id",
            "message": "tool_use_id 'call_2' does not match a tool_use of the previous assistant message",
            "type": "value_error",
        }
    ]
    assert err.message == "invalid request: messages.2.content.0.tool_use_id: " + err.details[0]["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "a JSON request body is required"),
        (b"  \n", "required"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"x"', "JSON object"),
    ],
)
async def test_body_that_is_not_a_json_object(raw: bytes, problem: str) -> None:
    err = await refused(raw)
    assert fields(err) == ["body"] and problem in err.message


# --- what the model accepts and how it normalises ------------------------------------------------


@pytest.mark.parametrize(
    ("system", "texts"),
    [
        ("be brief", ["be brief"]),
        (["be brief", "be kind"], ["be brief", "be kind"]),
        ({"text": "be brief"}, ["be brief"]),
        ([{"text": "be brief"}, {"text": "be kind", "citations": []}], ["be brief", "be kind"]),
        ([{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}], ["be brief"]),
        (None, []),
    ],
    ids=["str", "list-str", "object", "list-object", "anthropic-blocks", "null"],
)
async def test_system_forms_are_normalised(system: Any, texts: list[str]) -> None:
    chat = await parse(body(system=system))
    assert [s.text for s in chat.system or ()] == texts
    assert all(isinstance(s, System) for s in chat.system or ())
    assert chat.system_text == "\n\n".join(texts)


async def test_system_role_messages_are_folded_after_the_system_field() -> None:
    chat = await parse(
        body(
            system="first",
            messages=[
                {"role": "system", "content": "rules"},
                *USER,
                {"role": "system", "content": [{"type": "text", "text": "more"}]},
            ],
        )
    )
    assert [s.text for s in chat.system or ()] == ["first", "rules", "more"]
    assert [m.role for m in chat.messages] == ["user"]


async def test_a_valid_tool_round_trip_is_accepted() -> None:
    msgs = [
        *USER,
        {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, {"type": "text", "text": "x"}, CALL],
        },
        result(content=[{"type": "text", "text": "sunny"}]),
    ]
    chat = await parse(body(messages=msgs, tools=[TOOL], tool_choice={"type": "tool", "name": "weather"}))
    assert chat.messages[2].content[0].text() == "sunny"  # type: ignore[union-attr]
    assert chat.tool_choice is not None and chat.tool_choice.name == "weather"


async def test_tool_choice_may_name_a_tool_of_an_mcp_server() -> None:
    mcp = [{"name": "calc", "url": "https://1.1.1.1/mcp"}]  # a global address: the egress check needs no lookup
    chat = await parse(body(mcp_servers=mcp, tool_choice={"type": "tool", "name": "add"}))
    assert chat.tool_choice is not None and chat.tool_choice.name == "add"
    assert (await parse(body(mcp_servers=mcp, tool_choice={"type": "any"}))).tool_choice is not None


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "object"}),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "required": ["a"]}}},
            {"type": "object", "required": ["a"]},
        ),
        ({"type": "json_schema", "schema": {"type": "array"}}, {"type": "array"}),
    ],
)
async def test_response_format_becomes_output_config(
    response_format: dict[str, Any], schema: dict[str, Any] | None
) -> None:
    chat = await parse(body(response_format=response_format))
    assert (chat.output_format.schema_ if chat.output_format else None) == schema


async def test_every_documented_field_is_accepted() -> None:
    chat = await parse(
        body(
            system="s",
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            seed=7,
            stop_sequences=["END"],
            tool_context=[{"type": "text", "text": "ctx"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
            priority=3,
            metadata={"user_id": "u1"},
            correlation_id="corr-1",
            service_tier="auto",
            inference_geo="eu",
            container="c1",
            cache_control={"type": "ephemeral"},
            context_management={"edits": []},
            maximum_loaded_skills=2,
            stream=False,
        )
    )
    assert chat.top_k == 40 and chat.priority == 3 and chat.cache_control is not None and chat.stream is False
    assert (await parse(body(priority=None))).priority == 0, "null priority is the default"


# --- rules that need settings -------------------------------------------------------------------


async def test_message_tool_and_text_limits() -> None:
    settings = load_settings(
        environ={}, limits={"max_messages": 2, "max_tools": 1, "max_text_chars": 10, "max_schema_bytes": 256}
    )
    assert fields(await refused(body(messages=USER * 3), settings)) == ["messages"]
    assert fields(await refused(body(tools=[TOOL, {**TOOL, "name": "other"}]), settings)) == ["tools"]
    err = await refused(body(messages=[{"role": "user", "content": "x" * 11}]), settings)
    assert fields(err) == ["messages"] and "10 characters" in err.message
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20)}}
    assert fields(await refused(body(tools=[{**TOOL, "input_schema": big}]), settings)) == ["tools.0.input_schema"]
    assert fields(await refused(body(response_format={"type": "json_schema", "schema": big}), settings)) == [
        "response_format.schema"
    ]
    await parse(body(messages=[{"role": "user", "content": "x" * 10}]), settings)


# Moved here from tests/test_hardening_input.py (test_patterns_re2_cannot_run_are_422).
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (
            {
                "output_config": {
                    "format": {
                        "type": "json_schema",
                        "schema": {"type": "object", "properties": {"s": {"type": "string", "pattern": r"(a)\1"}}},
                    }
                }
            },
            "output_config.format.schema.properties.s.pattern",
        ),
        (
            {
                "output_config": {
                    "format": {"type": "json_schema", "schema": {"type": "object", "patternProperties": {"(?=x)y": {}}}}
                }
            },
            "output_config.format.schema.patternProperties.(?=x)y",
        ),
        (
            {
                "tools": [
                    {
                        "name": "t",
                        "input_schema": {
                            "type": "object",
                            "properties": {"q": {"type": "string", "pattern": "(?<!a)b"}},
                        },
                    }
                ]
            },
            "tools.0.input_schema.properties.q.pattern",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "p", "schema": {"type": "string", "pattern": r"(x)\1"}},
                }
            },
            "response_format.json_schema.schema.pattern",
        ),
    ],
)
async def test_patterns_re2_cannot_run_are_refused(extra: dict[str, Any], field: str) -> None:
    err = await refused(body(**extra))
    assert fields(err)[0] == field and "RE2" in err.message


async def test_remote_refs_are_refused_naming_the_path() -> None:
    err = await refused(
        body(output_config={"format": {"type": "json_schema", "schema": {"$ref": "https://example.com/s.json"}}})
    )
    assert fields(err) == ["output_config.format.schema.$ref"]


async def test_deep_nesting_is_refused_before_validation() -> None:
    raw = orjson.dumps(body())[:-1] + b', "tool_context": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}"
    err = await refused(raw)
    assert fields(err)[0] == "tool_context" + ".a" * 63 and "max_json_depth" in err.message


# Moved here from tests/test_tools.py and tests/test_hardening_mcp.py (over HTTP they keep one address each).
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/mcp",
        "http://10.0.0.1/mcp",
        "http://localhost:9/mcp",
        "ftp://example.com/x",
        "http://[::1]:9/mcp",
        "http://100.64.0.1/mcp",
        "http://[64:ff9b::a9fe:a9fe]/mcp",
        "http://[2002:a00:1::1]/mcp",
        "http://[::ffff:10.0.0.1]/mcp",
    ],
)
async def test_request_mcp_urls_must_pass_the_egress_rules(url: str) -> None:
    err = await refused(body(mcp_servers=[{"name": "x", "url": url}]))
    assert fields(err) == ["mcp_servers.0.url"] and "MCP server 'x' is not allowed" in err.message


async def test_allow_listed_mcp_urls_pass() -> None:
    settings = load_settings(environ={}, egress={"allow_hosts": ["127.0.0.1:9"]})
    chat = await parse(
        body(mcp_servers=[{"name": "x", "url": "http://127.0.0.1:9/mcp", "authorization_token": "tok-42"}]), settings
    )
    assert chat.mcp_servers is not None and chat.mcp_servers[0].url == "http://127.0.0.1:9/mcp"
    assert chat.mcp_servers[0].authorization_token == "tok-42"
    assert "tok-42" not in repr(chat.mcp_servers[0]), "the token stays out of reprs (and logs)"


async def test_configured_mcp_servers_by_name() -> None:
    settings = load_settings(
        environ={},
        mcp_servers=[
            {
                "name": "tools",
                "url": "http://127.0.0.1:9/mcp",
                "authorization_token_env": "X",
                "allowed_tools": ["add", "lookup"],
            },
            {"name": "docs", "url": "https://docs.example.com/mcp"},
        ],
    )
    chat = await parse(body(mcp_servers=[{"name": "tools"}]), settings)
    server = chat.mcp_servers[0]  # type: ignore[index]
    assert server.url is None, "it stays a name: the run looks up the URL and token"
    assert server.tool_configuration.allowed_tools == ["add", "lookup"]
    chat = await parse(
        body(mcp_servers=[{"name": "tools", "tool_configuration": {"allowed_tools": ["add", "rm"]}}]), settings
    )
    assert chat.mcp_servers[0].tool_configuration.allowed_tools == ["add"], (
        "a request narrows the operator's list, never widens it"
    )  # type: ignore[index]
    assert (await parse(body(mcp_servers=[{"name": "docs"}]), settings)).mcp_servers[
        0
    ].tool_configuration.allowed_tools is None  # type: ignore[index]
    err = await refused(body(mcp_servers=[{"name": "unknown"}]), settings)
    assert fields(err) == ["mcp_servers.0.url"] and "(configured: tools, docs)" in err.message


def test_unknown_model_lists_the_available_names() -> None:
    models = ModelTable(
        load_settings(environ={}, models=[{"name": "gpt", "provider": "openai", "aliases": ["gpt-alias"]}])
    )
    assert models.resolve("gpt-alias").name == "gpt" and models.resolve(None).name == "local"
    with pytest.raises(Invalid) as caught:
        models.resolve("gpt-9000")
    assert caught.value.details == [{"field": "model", "message": caught.value.message, "type": "value_error"}]
    assert "available: gpt, gpt-alias, local" in caught.value.message


def test_the_model_itself_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="max_token"):
        ChatRequest.model_validate(body(max_token=5))
