"""What every dialect shares: request-parsing helpers, the per-event render cache, usage numbers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..events import dumps_sized as dumps  # rendered bytes are cached on events: no 4 KiB orjson buffers


class DialectError(ValueError):
    """A request the dialect cannot translate; the edge answers 422 naming `field`."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


# --- the render cache ------------------------------------------------------------------------
# A stored event is one object shared by every watcher of its run (the store's tail), so the
# bytes a dialect renders for it are kept on it, beside the native frame. Renderers are
# deterministic functions of the log, so any watcher's bytes are every watcher's bytes.
# `Event.rendered` is None, then (dialect, value) for the usual single dialect, and a dict
# only once a second dialect watches the same run: a pair costs far less memory per event.


def cached(event: Any, key: str) -> Any:
    rendered = getattr(event, "rendered", None)
    if rendered is None:
        return None
    if type(rendered) is tuple:
        return rendered[1] if rendered[0] == key else None
    return rendered.get(key)


def remember(event: Any, key: str, value: Any) -> None:
    try:
        rendered = event.rendered
    except AttributeError:  # an event without the cache slot: nothing is shared
        return
    if rendered is None:
        event.rendered = (key, value)
    elif type(rendered) is tuple:
        event.rendered = {rendered[0]: rendered[1], key: value}
    else:
        rendered[key] = value


def delta_json(event: Any) -> bytes:
    """A delta event's `delta` as JSON, cut from its stored bytes without parsing them.

    `Event.build` writes an event's own fields after id, timestamp and message_id, and
    `delta` is the last field of every delta event; inside a JSON string a quote is always
    escaped, so the last `,"delta":` is the key itself.
    """
    data = event.data
    i = data.rfind(b',"delta":')
    if i < 0 or data[-1:] != b"}":
        return dumps(event.load()["delta"])
    return data[i + 9 : -1]


# --- request helpers --------------------------------------------------------------------------


def require_dict(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DialectError(f"{field} must be an object", field)
    return value


def require_list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise DialectError(f"{field} must be an array", field)
    return value


def reject_unknown(body: dict[str, Any], known: frozenset[str], where: str = "") -> None:
    """Unknown fields are 422, as on the native surface: a typo must not silently change behaviour."""
    for key in body:
        if key not in known:
            raise DialectError(f"unknown field {where}{key!r}", f"{where}{key}")


def image_source(url: Any, field: str) -> dict[str, Any]:
    """An image URL (a `data:` URL or a remote one) as a native image source."""
    if not isinstance(url, str) or not url:
        raise DialectError(f"{field} must be a non-empty string", field)
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media_type:
            raise DialectError("a data URL must look like data:<media type>;base64,<data>", field)
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def thinking_for_effort(effort: Any, field: str) -> dict[str, Any] | None:
    """An OpenAI reasoning effort as native `thinking` (None: no reasoning asked for)."""
    if effort is None or effort == "none":
        return None
    if effort not in EFFORTS:
        raise DialectError(f"{field} must be one of none, minimal, low, medium, high", field)
    return {"enabled": True, "effort": EFFORTS[effort]}


def json_schema_format(spec: dict[str, Any], schema_field: str) -> dict[str, Any]:
    """An OpenAI json_schema format as native `output_config.format`."""
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise DialectError(f"{schema_field} must be a JSON Schema object", schema_field)
    out: dict[str, Any] = {"type": "json_schema", "schema": schema}
    if spec.get("name") is not None:
        out["name"] = spec["name"]
    if spec.get("strict") is not None:
        out["strict"] = spec["strict"]
    return out


def merge_message(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append blocks as a turn of `role`, joining the previous turn if it has the same role.

    Tool results come as separate items in OpenAI's formats but belong in one user turn
    (upstreams such as Anthropic need user and assistant turns to alternate).
    """
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def tool_input(arguments: Any, field: str) -> dict[str, Any]:
    """A function call's `arguments` (a JSON string) as a tool_use input object."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise DialectError(f"{field} must be a JSON string", field)
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise DialectError(f"{field} is not valid JSON", field) from None
    if not isinstance(value, dict):
        raise DialectError(f"{field} must encode a JSON object", field)
    return value


def function_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    tool: dict[str, Any] = {
        "name": name,
        "input_schema": parameters if parameters is not None else {"type": "object", "properties": {}},
    }
    if description is not None:
        tool["description"] = description
    return tool


def user_metadata(metadata: Any, user: Any) -> dict[str, Any]:
    """OpenAI's `metadata` and `user` as native metadata (`user_id`, like Anthropic's)."""
    out = dict(require_dict(metadata, "metadata")) if metadata is not None else {}
    if user is not None:
        out["user_id"] = user
    return out


# --- usage ------------------------------------------------------------------------------------


def tokens(usage: dict[str, Any] | None, key: str) -> int:
    value = (usage or {}).get(key)
    return value if isinstance(value, int) else 0


def openai_tool_choice(
    choice: Any, parallel: Any, function_name: Callable[[dict[str, Any]], Any], expected: str
) -> dict[str, Any] | None:
    """OpenAI's `tool_choice` and `parallel_tool_calls` as the native tool_choice.

    Both OpenAI surfaces spell it alike except where a named function's name sits: `function_name`
    reads it, `expected` names that shape in the error.
    """
    if choice is None:
        out = None
    elif choice in ("none", "auto"):
        out = {"type": choice}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out = {"type": "tool", "name": function_name(choice)}
    else:
        raise DialectError(f'tool_choice must be "none", "auto", "required" or {expected}', "tool_choice")
    if parallel is False:
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out
