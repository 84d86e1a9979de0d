"""What the sync and async clients share: settings, typed errors, events, resume bookkeeping."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

DEFAULT_URL = "http://127.0.0.1:8080"
ASYNC = "/v1/messages/async"


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Run:
    """A started background run."""

    message_id: str
    status: str


@dataclass(frozen=True)
class StreamEvent:
    """One event of a run: `seq` is its position (the resume cursor), `type` its name, `data` its fields."""

    seq: int
    type: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- errors


class BackstreamError(Exception):
    """An error answer of the server: `{"error": {"type", "message", "details"?}, "request_id"}`."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str = "error",
        details: list[Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.details = details
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        where = f" ({self.status_code} {self.type})" if self.status_code else ""
        return f"{self.message}{where}"


class APIConnectionError(BackstreamError):
    """The server could not be reached (or kept failing) within the client's patience."""


class AuthenticationError(BackstreamError):
    """401: no or bad credentials."""


class PermissionDeniedError(BackstreamError):
    """403: valid credentials, but not for that tenant or action."""


class NotFoundError(BackstreamError):
    """404: unknown id (or another tenant's)."""


class ConflictError(BackstreamError):
    """409: the message_id exists, or the run already completed or failed."""


class RequestTooLargeError(BackstreamError):
    """413: the body is too large."""


class InvalidRequestError(BackstreamError):
    """422: the request is invalid; `details` names the fields."""


class RateLimitError(BackstreamError):
    """429: a rate or queue limit; `retry_after` says when to try again."""


class ServerError(BackstreamError):
    """5xx: the upstream provider failed, the server is overloaded or its store is unreachable."""


_BY_STATUS: dict[int, type[BackstreamError]] = {
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
}


def error_from(status: int, content: bytes, headers: httpx.Headers) -> BackstreamError:
    """The typed exception for an error answer, carrying its error shape."""
    try:
        body = orjson.loads(content) if content else None
    except orjson.JSONDecodeError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else BackstreamError)
    return cls(
        str(err.get("message") or f"HTTP {status}"),
        status_code=status,
        type=str(err.get("type") or "error"),
        details=err.get("details"),
        request_id=(body.get("request_id") if isinstance(body, dict) else None) or headers.get("x-request-id"),
        retry_after=retry_after_of(headers),
        body=body,
    )


def retry_after_of(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@contextmanager
def connection_errors(base_url: str) -> Iterator[None]:
    """A network failure (refused, reset, timed out) raised as `APIConnectionError`."""
    try:
        yield
    except httpx.TransportError as exc:
        raise APIConnectionError(f"cannot reach {base_url}: {exc or type(exc).__name__}") from exc


def retryable(exc: BaseException) -> bool:
    """Worth reconnecting a watch for: the network, a restarting server, overload."""
    if isinstance(exc, httpx.TransportError | APIConnectionError):
        return True
    return isinstance(exc, BackstreamError) and exc.status_code in (429, 500, 502, 503, 504)


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    base_url: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    stream_timeout: httpx.Timeout
    max_reconnect_s: float


def settings(
    base_url: str | None,
    api_key: str | None,
    tenant: str | None,
    timeout: float,
    stream_read_timeout: float,
    max_reconnect_s: float,
) -> Settings:
    """Explicit arguments first, then BACKSTREAM_URL / BACKSTREAM_API_KEY / BACKSTREAM_TENANT, then defaults."""
    from .. import __version__

    url = (base_url or os.environ.get("BACKSTREAM_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("BACKSTREAM_API_KEY")
    tenant = tenant if tenant is not None else os.environ.get("BACKSTREAM_TENANT")
    headers = {"user-agent": f"backstream-python/{__version__}"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    if tenant:
        headers["x-tenant"] = tenant
    # A watch is quiet between events (the server sends a keepalive every 15 s by default):
    # a read that waits longer than stream_read_timeout means a dead connection, so reconnect.
    stream = httpx.Timeout(timeout, read=stream_read_timeout)
    return Settings(url, headers, httpx.Timeout(timeout), stream, max_reconnect_s)


def start_request(body: dict[str, Any], message_id: str | None) -> tuple[dict[str, str] | None, dict[str, Any]]:
    return ({"message_id": message_id} if message_id else None), body


def list_params(
    status: str | None,
    model: str | None,
    created_after: str | None,
    created_before: str | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, Any]:
    given = {
        "status": status,
        "model": model,
        "created_after": created_after,
        "created_before": created_before,
        "limit": limit,
        "cursor": cursor,
    }
    return {k: v for k, v in given.items() if v is not None}


# ---------------------------------------------------------------- watching


def event_of(seq: str | None, type: str, data: str) -> StreamEvent | None:
    """A parsed SSE frame as an event; None for frames that are not events (no id)."""
    if not seq or not seq.isdecimal():
        return None
    try:
        fields = orjson.loads(data) if data else {}
    except orjson.JSONDecodeError:
        fields = {"raw": data}
    return StreamEvent(int(seq), type or "message", fields if isinstance(fields, dict) else {"value": fields})


class Resume:
    """A watch's cursor and reconnect pacing: events at or before the cursor are never yielded twice."""

    def __init__(self, after: int | None, max_reconnect_s: float, clock: Any) -> None:
        self.cursor = after or 0
        self.ended = False
        self.max_reconnect_s = max_reconnect_s
        self._clock = clock
        self._delay = 0.1
        self._stalled_since: float | None = None

    def params(self) -> tuple[dict[str, str], dict[str, str]]:
        """Query and headers of the next (re)connection."""
        if not self.cursor:
            return {}, {}
        return {"after": str(self.cursor)}, {"last-event-id": str(self.cursor)}

    def accept(self, event: StreamEvent) -> bool:
        """True for a new event (past the cursor), which moves the cursor."""
        if event.seq <= self.cursor:
            return False
        self.cursor = event.seq
        self.ended = event.type == "stream_end"
        self._delay = 0.1
        self._stalled_since = None
        return True

    def next_delay(self, exc: BaseException | None) -> float:
        """Seconds to wait before reconnecting; raises when the server stayed away too long."""
        now = self._clock()
        if self._stalled_since is None:
            self._stalled_since = now
        if now - self._stalled_since > self.max_reconnect_s:
            if isinstance(exc, BackstreamError):
                raise exc
            raise APIConnectionError(f"gave up reconnecting after {self.max_reconnect_s:g} s: {exc}") from exc
        delay = self._delay * (0.75 + random.random() / 2)
        self._delay = min(self._delay * 2, 5.0)
        if isinstance(exc, BackstreamError) and exc.retry_after:
            delay = max(delay, min(exc.retry_after, 30.0))
        return delay
