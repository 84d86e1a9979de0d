"""Domain errors: what went wrong, in the contract's vocabulary, without HTTP.

The core raises these; only the HTTP edge (`http/errors.py`) turns them into a status,
headers and the shared error shape. `type` is the error type the contract names
(`invalid_request_error`, `not_found_error`, …), which also appears in run events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class GatewayError(Exception):
    """A failure the caller should be told about: type, message and field-level details."""

    type = "api_error"

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(GatewayError):
    """The request is wrong; `field` names where (becomes the details)."""

    type = "invalid_request_error"

    def __init__(self, message: str, field: str | None = None, details: list[dict[str, Any]] | None = None) -> None:
        if details is None and field is not None:
            details = [{"field": field, "message": message, "type": "value_error"}]
        super().__init__(message, details)


class NotFound(GatewayError):
    """Unknown id, or one of another tenant (never revealed to exist)."""

    type = "not_found_error"

    def __init__(self, what: str = "message") -> None:
        super().__init__(f"{what} not found")


class Conflict(GatewayError):
    """The action does not fit the run's state (an id taken, a run already ended)."""

    type = "conflict_error"


class TooLarge(GatewayError):
    """A request body or head beyond the configured limit."""

    type = "request_too_large"


class RateLimited(GatewayError):
    """A rate, quota or queue limit was reached; worth retrying after `retry_after_s`."""

    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, retry_after_s)


class QueueFull(RateLimited):
    """The background run queue holds runs.queue_limit runs already."""


class Unauthenticated(GatewayError):
    """No or bad credentials; `challenge` is the Bearer challenge's error code, if any."""

    type = "authentication_error"

    def __init__(self, message: str, challenge: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.challenge = challenge


class Forbidden(GatewayError):
    """The credentials are valid but may not do this (act for that tenant)."""

    type = "permission_error"


class Unavailable(GatewayError):
    """A dependency (the store, a component) cannot be used now; retry shortly."""

    type = "overloaded_error"

    def __init__(
        self, message: str, details: list[dict[str, Any]] | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, details)
        self.retry_after_s = retry_after_s


class ModelUnavailable(Unavailable):
    """The model cannot be called as configured (its `api_key_env` variable is not set)."""

    type = "model_unavailable"


class RunFailed(GatewayError):
    """A synchronous run failed before its first output; `type` is the run's own error type."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type


def pydantic_details(errors: Sequence[Mapping[str, Any]], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Turn pydantic's error list into `{field, message, type}` details with dotted field paths."""
    out = []
    for e in errors:
        loc = [*prefix, *e.get("loc", ())]
        # Cross-field checks raise an error that knows its field (api_models._FieldError).
        field = getattr((e.get("ctx") or {}).get("error"), "field", None)
        if field:
            loc = [*prefix, *field.split(".")]
        # pydantic puts the union member or validator name in the path; keep only real fields/indices.
        parts = [str(p) for p in loc if not (isinstance(p, str) and _is_union_member(p))]
        msg = e.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append({"field": ".".join(parts) or "body", "message": msg, "type": e.get("type", "value_error")})
    return out


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _is_union_member(part: str) -> bool:
    """pydantic names the union member it tried in the path (`str`, `list[...]`, `ThinkingEnabled`); our fields are lowercase."""
    return part in _TYPE_NAMES or part[:1].isupper() or "[" in part or part.startswith(("function-", "literal"))
