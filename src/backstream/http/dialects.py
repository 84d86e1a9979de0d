"""Which wire dialect a request speaks, decided from the request alone so that every answer,
errors from the middleware included, comes in the shape its client parses.

- `/v1/chat/completions` and `/v1/responses…`: OpenAI's.
- anything else with an `anthropic-version` header (the Anthropic SDK always sends it)
  or `?format=anthropic`: Anthropic's.
- otherwise Backstream's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Scope

from ..dialects import ANTHROPIC, NATIVE, OPENAI_CHAT, anthropic, openai_chat
from ..dialects.common import DialectError
from ..errors import Invalid

ErrorBody = Callable[[str, str, str, list[dict[str, Any]] | None], bytes]
OPENAI_PATHS = ("/v1/chat/completions", "/v1/responses")


def dialect_of(scope: Scope) -> str:
    """`anthropic`, `chat` (OpenAI's shapes, both surfaces) or `native`."""
    path = scope.get("path", "")
    if path.startswith(OPENAI_PATHS):
        return OPENAI_CHAT
    if wants_anthropic(scope):
        return ANTHROPIC
    return NATIVE


def wants_anthropic(scope: Scope) -> bool:
    if any(name == b"anthropic-version" for name, _ in scope.get("headers", ())):
        return True
    query = scope.get("query_string", b"")
    return b"format=" in query and parse_qs(query.decode("latin-1")).get("format", [None])[-1] == "anthropic"


def error_body_for(scope: Scope) -> ErrorBody | None:
    """The dialect's error body builder, or None for the native shape."""
    dialect = dialect_of(scope)
    if dialect == ANTHROPIC:
        return anthropic.error_body
    if dialect == OPENAI_CHAT:
        return openai_chat.error_body
    return None


def translated(parse: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A dialect's request parser whose refusals are the usual 422 naming the field."""

    def translate(body: dict[str, Any]) -> dict[str, Any]:
        try:
            return parse(body)
        except DialectError as exc:
            raise Invalid(exc.message, exc.field) from None

    return translate
