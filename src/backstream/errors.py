"""The one error shape every failing response uses, and the exceptions that produce it."""

from __future__ import annotations

from typing import Any

import orjson

# error type -> HTTP status; also used to map a run's final error onto a status for sync calls.
STATUS_BY_TYPE = {
    "invalid_request_error": 422,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "upstream_error": 502,
    "overloaded_error": 503,
    "timeout_error": 504,
    "api_error": 500,
}


class ApiError(Exception):
    """An error answered to the client in the shared shape."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.details = details
        self.headers = headers or {}


def invalid(message: str, field: str | None = None, details: list[dict[str, Any]] | None = None) -> ApiError:
    if details is None and field is not None:
        details = [{"field": field, "message": message, "type": "value_error"}]
    return ApiError(422, "invalid_request_error", message, details)


def not_found(what: str = "message") -> ApiError:
    return ApiError(404, "not_found_error", f"{what} not found")


def error_body(type: str, message: str, request_id: str, details: list[dict[str, Any]] | None = None) -> bytes:
    error: dict[str, Any] = {"type": type, "message": message}
    if details:
        error["details"] = details
    return orjson.dumps({"error": error, "request_id": request_id})


def pydantic_details(errors: list[dict[str, Any]], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Turn pydantic's error list into `{field, message, type}` details with dotted field paths."""
    out = []
    for e in errors:
        loc = [*prefix, *e.get("loc", ())]
        # Cross-field checks raise an error that knows its field (schema._FieldError).
        field = getattr((e.get("ctx") or {}).get("error"), "field", None)
        if field:
            loc = [*prefix, *field.split(".")]
        # pydantic puts the union member or validator name in the path; keep only real fields/indices.
        parts = [str(p) for p in loc if not (isinstance(p, str) and _is_union_member(p))]
        msg = e.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append({"field": ".".join(parts) or "body", "message": msg, "type": e.get("type", "value_error")})
    return out


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _is_union_member(part: str) -> bool:
    """pydantic names the union member it tried in the path (`str`, `list[...]`, `ThinkingEnabled`); our fields are lowercase."""
    return part in _TYPE_NAMES or part[:1].isupper() or "[" in part or part.startswith(("function-", "literal"))
