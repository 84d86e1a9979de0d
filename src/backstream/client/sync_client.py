"""`Client`: the blocking Backstream client (httpx). `AsyncClient` is its twin, method for method."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import EventSource

from .common import (
    ASYNC,
    Resume,
    Run,
    StreamEvent,
    connection_errors,
    error_from,
    event_of,
    list_params,
    retryable,
    settings,
    start_request,
)


class Client:
    """Start, watch (with automatic resume), inspect, cancel and delete background runs; chat synchronously.

    `base_url`, `api_key` and `tenant` default to BACKSTREAM_URL, BACKSTREAM_API_KEY and
    BACKSTREAM_TENANT. Error answers raise `BackstreamError` subclasses carrying the error body.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        tenant: str | None = None,
        *,
        timeout: float = 30.0,
        stream_read_timeout: float = 60.0,
        max_reconnect_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._s = settings(base_url, api_key, tenant, timeout, stream_read_timeout, max_reconnect_s)
        self._http = httpx.Client(
            base_url=self._s.base_url, headers=self._s.headers, timeout=self._s.timeout, transport=transport
        )

    @property
    def base_url(self) -> str:
        return self._s.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with connection_errors(self._s.base_url):
            resp = self._http.request(method, path, **kw)
        if resp.status_code >= 400:
            raise error_from(resp.status_code, resp.content, resp.headers)
        return resp

    # ------------------------------------------------------------ background runs
    def start(self, *, message_id: str | None = None, **body: Any) -> Run:
        """Start a background run with a native request body (`messages`, `model`, `max_tokens`, …)."""
        params, payload = start_request(body, message_id)
        data = self._request("POST", ASYNC, params=params, json=payload).json()
        return Run(data["message_id"], data["status"])

    def status(self, message_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"{ASYNC}/{message_id}/status").json()
        return result

    def result(self, message_id: str) -> dict[str, Any]:
        """The run folded into one message, plus `status` (what exists so far while it runs)."""
        result: dict[str, Any] = self._request("GET", f"{ASYNC}/{message_id}/result").json()
        return result

    def cancel(self, message_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"{ASYNC}/{message_id}/cancel").json()
        return result

    def delete(self, message_id: str) -> None:
        self._request("DELETE", f"{ASYNC}/{message_id}")

    def list(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every run matching the filters, page after page (`GET /v1/messages/async`, cursor pages)."""
        cursor: str | None = None
        while True:
            params = list_params(status, model, created_after, created_before, limit, cursor)
            page = self._request("GET", ASYNC, params=params).json()
            yield from page.get("data") or []
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def watch(self, message_id: str, after: int | None = None) -> Iterator[StreamEvent]:
        """Every event after `after`, live, until `stream_end`; reconnects by itself (resuming
        from the last seq, with backoff) after a dropped connection or a server restart, never yielding an
        event twice. Raises `NotFoundError` for an unknown run or one deleted meanwhile, and `APIConnectionError`
        (or the last error answer) once the server stayed unreachable for `max_reconnect_s`."""
        resume = Resume(after, self._s.max_reconnect_s, time.monotonic)
        while not resume.ended:
            try:
                yield from self._watch_once(message_id, resume)
                if resume.ended:
                    return
                error: BaseException | None = None  # closed cleanly without stream_end: resume
            except Exception as exc:
                if not retryable(exc):
                    raise
                error = exc
            time.sleep(resume.next_delay(error))

    def _watch_once(self, message_id: str, resume: Resume) -> Iterator[StreamEvent]:
        params, headers = resume.params()
        url = f"{ASYNC}/{message_id}/stream"
        with self._http.stream("GET", url, params=params, headers=headers, timeout=self._s.stream_timeout) as resp:
            if resp.status_code >= 400:
                raise error_from(resp.status_code, resp.read(), resp.headers)
            for sse in EventSource(resp).iter_sse():
                event = event_of(sse.id, sse.event, sse.data)
                if event is not None and resume.accept(event):
                    yield event
                    if resume.ended:
                        return

    # ------------------------------------------------------------ synchronous runs
    def chat(self, **body: Any) -> Iterator[StreamEvent]:
        """`POST /v1/messages` streamed: the run's events as they come (leaving early cancels the run)."""
        payload = {**body, "stream": True}
        timeout = self._s.stream_timeout
        stream = self._http.stream("POST", "/v1/messages", json=payload, timeout=timeout)
        with connection_errors(self._s.base_url), stream as resp:
            if resp.status_code >= 400:
                raise error_from(resp.status_code, resp.read(), resp.headers)
            for sse in EventSource(resp).iter_sse():
                event = event_of(sse.id, sse.event, sse.data)
                if event is not None:
                    yield event

    def create(self, **body: Any) -> dict[str, Any]:
        """`POST /v1/messages` without streaming: the folded message."""
        result: dict[str, Any] = self._request("POST", "/v1/messages", json={**body, "stream": False}).json()
        return result
