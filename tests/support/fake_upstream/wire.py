"""HTTP/1.1 response bytes, written by hand so tests control exactly what goes on the wire."""

from __future__ import annotations

import http

TERM = b"0\r\n\r\n"  # the chunk that ends a chunked body; DROP faults leave it out
HIGH_WATER = 1 << 16  # drain the socket once this much is buffered


def frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return {529: "Overloaded"}.get(status, "Unknown")


def head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(status: int, body: bytes, keep_alive: bool, extra: list[tuple[str, str]] | None = None) -> bytes:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if extra:
        headers.extend(extra)
    if not keep_alive:
        headers.append(("connection", "close"))
    return head(status, headers) + body


def sse_head(keep_alive: bool, request_id_header: str, request_id: str) -> bytes:
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("transfer-encoding", "chunked"),
        ("cache-control", "no-cache"),
        (request_id_header, request_id),
        ("connection", "keep-alive" if keep_alive else "close"),
    ]
    return head(200, headers)


class Plan:
    """One streaming response, pre-encoded as chunks so that sending it costs no encoding.

    ``body`` pairs each chunk with whether it is a content chunk: pacing (ttft, delay) and
    ``fault_after`` count content chunks only.
    """

    __slots__ = ("preamble", "body", "trailer", "malformed", "error")

    def __init__(self) -> None:
        self.preamble: list[bytes] = []
        self.body: list[tuple[bytes, bool]] = []
        self.trailer: list[bytes] = []
        self.malformed: bytes = b""  # sent in place of a content chunk by Fault.MALFORMED
        self.error: bytes = b""  # the error event of Fault.ERROR_EVENT
