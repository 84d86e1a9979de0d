"""What every provider yields: a stream of normalised deltas, as plain tuples.

Tuples rather than objects because this is the hot path (one per upstream token):

    ("text", str)                      ("thinking", str)      ("signature", str)
    ("tool_start", index, id, name)    ("tool_delta", index, partial_json)
    ("usage", dict)                    ("finish", reason)     # reason: Stop|Length|StopSequence|ToolUse
    ("error", type, message)           # the upstream reported an error inside the stream
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

import httpx2 as httpx  # the transport both official SDKs are built on

from ..api_models import ChatRequest
from ..config import ModelConfig

Delta = tuple[Any, ...]

# Upstream error types, chosen to map onto our error shape and HTTP status.
RATE_LIMITED = "overloaded_error"  # upstream 429: to the client it is overload, not its own rate limit
OVERLOADED = "overloaded_error"
UPSTREAM = "upstream_error"
TIMEOUT = "timeout_error"
MODEL_UNAVAILABLE = "model_unavailable"  # not callable as configured: no request goes upstream


def unavailable_message(model: str, var: str) -> str:
    return f"model {model} is unavailable: its API key variable {var} (api_key_env) is not set on the server"


class UpstreamError(Exception):
    """A provider call failed. `retryable` says whether a retry or fallback may help."""

    def __init__(
        self,
        type: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def status_error(status: int, message: str, retry_after: float | None = None) -> UpstreamError:
    if status == 429:
        return UpstreamError(
            RATE_LIMITED,
            f"upstream rate limited the request: {message}",
            status=status,
            retryable=True,
            retry_after=retry_after,
        )
    if status in (503, 529):
        return UpstreamError(
            OVERLOADED, f"upstream overloaded: {message}", status=status, retryable=True, retry_after=retry_after
        )
    if status >= 500 or status == 408:
        return UpstreamError(
            UPSTREAM, f"upstream error {status}: {message}", status=status, retryable=True, retry_after=retry_after
        )
    return UpstreamError(UPSTREAM, f"upstream rejected the request ({status}): {message}", status=status)


def parse_retry_after(headers: httpx.Headers | None) -> float | None:
    if headers is None:
        return None
    raw = headers.get("retry-after-ms")
    try:
        if raw is not None:
            return float(raw) / 1000
        raw = headers.get("retry-after")
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def timeout_for(config: ModelConfig) -> httpx.Timeout:
    return httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0))


def sdk_error(
    exc: Exception, config: ModelConfig, timeout_cls: type[Exception], status_cls: type[Exception]
) -> UpstreamError:
    """Translate an SDK or transport exception (both official SDKs share one shape) into UpstreamError."""
    if isinstance(exc, status_cls):
        body = getattr(exc, "body", None)
        err = body.get("error", body) if isinstance(body, dict) else None
        message = str(err["message"]) if isinstance(err, dict) and err.get("message") else str(exc)
        response = getattr(exc, "response", None)
        status = int(getattr(exc, "status_code", 502))
        return status_error(status, message, parse_retry_after(response.headers if response is not None else None))
    if isinstance(exc, (timeout_cls, httpx.TimeoutException)):
        return UpstreamError(TIMEOUT, f"upstream did not answer within {config.timeout_s:g} s", retryable=True)
    return UpstreamError(UPSTREAM, f"upstream connection failed: {type(exc).__name__}", retryable=True)


class Provider:
    """Turns a validated request into a stream of deltas for one model of the table."""

    name = "base"

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def stream(self, request: ChatRequest, warnings: list[str]) -> AsyncGenerator[Delta, None]:
        """Start the upstream call. Raise `UpstreamError` for failures; closing the iterator closes the call."""
        raise NotImplementedError

    def missing_key(self) -> str | None:
        """The name of the `api_key_env` variable when it is configured but unset or empty."""
        var = self.config.api_key_env
        return var if var and not os.environ.get(var) else None

    def unavailable(self) -> UpstreamError | None:
        """Why this model cannot be called at all (checked before any request goes upstream)."""
        var = self.missing_key()
        if var is None:
            return None
        return UpstreamError(MODEL_UNAVAILABLE, unavailable_message(self.config.name, var))

    async def check(self) -> str | None:
        """Readiness: None when usable, else a reason."""
        var = self.missing_key()
        return None if var is None else f"environment variable {var} (api_key_env) is not set"

    async def aclose(self) -> None:
        return None


class SSEDecoder:
    """Incremental SSE parser over raw bytes: yields (event, data bytes) for each dispatched event.

    Leaner than the SDKs' typed streams: no str decoding, no per-chunk model objects.
    """

    __slots__ = ("_buf", "_event", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    out.append((self._event, b"\n".join(self._data)))
                self._event = b""
                self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            # comments (":") and other fields (id, retry) carry nothing we use
        self._buf = buf[start:]
        return out
