"""A scriptable fake LLM upstream speaking the OpenAI and Anthropic streaming wire formats.

It is a real HTTP/1.1 server written on raw asyncio streams (no web framework) so
that tests control exactly what goes on the wire: token pacing, malformed events,
dropped connections, and detection of the client closing the socket mid-response.

Thread mode (tests)::

    with FakeUpstream() as fake:
        fake.script("model-x", [Reply(status=429), Reply(tokens=["a", "b"])])
        client = openai.OpenAI(base_url=fake.base_url, api_key="x")
        ...

Standalone mode (benchmarks)::

    python -m tests.fake_upstream --port 0     # prints "READY http://127.0.0.1:PORT"

With no scripts, a model name that is a spec string such as
``"tokens=64;ttft_ms=20;delay_ms=5"`` is served per that spec (keys: tokens, ttft_ms,
delay_ms, status; also reasoning, fault, fault_after, finish).  Anything else gets
the default ``Reply()``.

Counting rules for ``Fault.*`` with ``fault_after``: "content chunks" are the
reasoning deltas, text deltas and tool-argument fragments, in the order they are
sent.  The preamble (OpenAI role chunk; Anthropic ``message_start``/``ping``) and
block bookkeeping events (``content_block_start``/``stop``, the OpenAI tool-call
header chunk, ``signature_delta``) are not counted.  The fault fires at the moment
content chunk number ``fault_after`` (0-based) would have been sent, i.e. after its
ttft/delay wait; if ``fault_after`` is >= the number of content chunks, it fires in
place of the closing events.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import http
import itertools
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import orjson

__all__ = ["FakeUpstream", "Reply", "Fault", "ToolCall", "Recorded"]

log = logging.getLogger(__name__)

_dumps = orjson.dumps


# --------------------------------------------------------------------------- model


class Fault(enum.Enum):
    HANG = "hang"
    MALFORMED = "malformed"
    DROP = "drop"
    ERROR_EVENT = "error_event"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class Reply:
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    ttft: float = 0.0
    delay: float = 0.0
    finish_reason: str | None = None
    usage: tuple[int, int] | None = None
    cache: tuple[int, int] = (0, 0)
    status: int = 200
    retry_after: str | None = None
    fault: Fault | None = None
    fault_after: int = 0
    # Extras (not in the original brief): override the error body of a non-200 reply.
    error_type: str | None = None
    error_message: str | None = None
    # Benchmarks: STAMP in a token is replaced, when that chunk is sent, by time.monotonic_ns()
    # (20 digits), so a watcher can measure upstream-send -> watcher-receive latency.
    stamp: bool = False


STAMP = b"@" * 20


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict
    model: str | None
    started_at: float
    finished_at: float | None = None
    client_closed_at: float | None = None
    completed: bool = False
    # Extras.
    method: str = "POST"
    query: str = ""
    provider: str = ""  # "openai" | "anthropic" | "" (other endpoints)
    stream: bool = False
    reply: Reply | None = None
    status: int | None = None


_DEFAULT_REPLY = Reply()

_TO_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "stop_sequence": "stop_sequence",
    "content_filter": "refusal",
}
_TO_OPENAI_FINISH = {
    "end_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "stop_sequence": "stop",
    "refusal": "content_filter",
}

_OPENAI_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _openai_finish(reply: Reply) -> str:
    fr = reply.finish_reason
    if fr is None:
        return "tool_calls" if reply.tool_calls else "stop"
    return _TO_OPENAI_FINISH.get(fr, fr)


def _anthropic_stop(reply: Reply) -> str:
    fr = reply.finish_reason
    if fr is None:
        return "tool_use" if reply.tool_calls else "end_turn"
    return _TO_ANTHROPIC_STOP.get(fr, fr)


def _usage(reply: Reply) -> tuple[int, int]:
    return reply.usage if reply.usage is not None else (10, len(reply.tokens))


def _openai_error_body(status: int, etype: str | None = None, message: str | None = None) -> dict:
    t, code = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    return {
        "error": {
            "message": message or f"Fake upstream error {status}",
            "type": etype or t,
            "param": None,
            "code": code,
        }
    }


def _anthropic_error_body(status: int, etype: str | None = None, message: str | None = None) -> dict:
    t = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {
        "type": "error",
        "error": {"type": etype or t, "message": message or f"Fake upstream error {status}"},
    }


# ------------------------------------------------------------------ spec strings

_SPEC_KEYS = {"tokens", "ttft_ms", "delay_ms", "status", "reasoning", "fault", "fault_after", "finish", "stamp"}


def parse_spec(model: str | None) -> Reply | None:
    """Parse ``"tokens=64;ttft_ms=20;delay_ms=5"`` into a Reply; None if not a spec."""
    if not model or "=" not in model:
        return None
    kv: dict[str, str] = {}
    for part in model.split(";"):
        part = part.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        k = k.strip().lower()
        if not sep or k not in _SPEC_KEYS:
            return None
        kv[k] = v.strip()
    try:
        reply = Reply()
        if "tokens" in kv:
            reply.tokens = [f" tok{i}" for i in range(int(kv["tokens"]))]
        if "reasoning" in kv:
            reply.reasoning = [f" think{i}" for i in range(int(kv["reasoning"]))]
        if "ttft_ms" in kv:
            reply.ttft = float(kv["ttft_ms"]) / 1000.0
        if "delay_ms" in kv:
            reply.delay = float(kv["delay_ms"]) / 1000.0
        if "status" in kv:
            reply.status = int(kv["status"])
        if "fault" in kv:
            reply.fault = Fault(kv["fault"].lower())
        if "fault_after" in kv:
            reply.fault_after = int(kv["fault_after"])
        if "finish" in kv:
            reply.finish_reason = kv["finish"]
        if kv.get("stamp") == "1":
            reply.stamp = True
            reply.tokens = [f" {STAMP.decode()}" for _ in reply.tokens]
    except ValueError:
        return None
    return reply


# -------------------------------------------------------------------- wire bits

_TERM = b"0\r\n\r\n"


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return {529: "Overloaded"}.get(status, "Unknown")


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(
    status: int, body: bytes, keep_alive: bool, extra: list[tuple[str, str]] | None = None
) -> bytes:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if extra:
        headers.extend(extra)
    if not keep_alive:
        headers.append(("connection", "close"))
    return _head(status, headers) + body


def _sse_head(keep_alive: bool, request_id_header: str, request_id: str) -> bytes:
    headers = [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("transfer-encoding", "chunked"),
        ("cache-control", "no-cache"),
        (request_id_header, request_id),
        ("connection", "keep-alive" if keep_alive else "close"),
    ]
    return _head(200, headers)


class _Plan:
    """Pre-encoded pieces of one streaming response."""

    __slots__ = ("preamble", "body", "trailer", "malformed", "error")

    def __init__(self) -> None:
        self.preamble: list[bytes] = []
        self.body: list[tuple[bytes, bool]] = []  # (framed bytes, is_content)
        self.trailer: list[bytes] = []
        self.malformed: bytes = b""
        self.error: bytes = b""


def _openai_plan(rid: str, model: str | None, created: int, reply: Reply, include_usage: bool) -> _Plan:
    p = _Plan()
    base = b'{"id":"%b","object":"chat.completion.chunk","created":%d,"model":%b,"system_fingerprint":null,' % (
        rid.encode(),
        created,
        _dumps(model),
    )
    head = b"data: " + base + b'"choices":[{"index":0,"delta":'
    tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def ev(delta: dict) -> bytes:
        return _frame(head + _dumps(delta) + tail)

    p.preamble.append(ev({"role": "assistant", "content": ""}))
    body = p.body
    for r in reply.reasoning:
        body.append((ev({"reasoning_content": r}), True))
    for t in reply.tokens:
        body.append((ev({"content": t}), True))
    for i, tc in enumerate(reply.tool_calls):
        body.append(
            (
                ev(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": tc.id,
                                "type": "function",
                                "function": {"name": tc.name, "arguments": ""},
                            }
                        ]
                    }
                ),
                False,
            )
        )
        for frag in tc.arguments:
            body.append((ev({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}), True))

    finish = _openai_finish(reply)
    p.trailer.append(
        _frame(head + b'{},"logprobs":null,"finish_reason":' + _dumps(finish) + b"}]}\n\n")
    )
    if include_usage:
        pt, ct = _usage(reply)
        usage: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        if reply.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": len(reply.reasoning)}
        if reply.cache[1]:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cache[1]}
        p.trailer.append(_frame(b"data: " + base + b'"choices":[],"usage":' + _dumps(usage) + b"}\n\n"))
    p.trailer.append(_frame(b"data: [DONE]\n\n"))
    p.malformed = _frame(b'data: {"choices": [{"delta": {"content": "x"\n\n')
    p.error = _frame(
        b"data: "
        + _dumps({"error": {"message": "Overloaded", "type": "server_error", "param": None, "code": None}})
        + b"\n\n"
    )
    return p


def _aevent(name: bytes, payload: dict) -> bytes:
    return _frame(b"event: " + name + b"\ndata: " + _dumps(payload) + b"\n\n")


def _anthropic_plan(mid: str, model: str | None, reply: Reply) -> _Plan:
    p = _Plan()
    pt, ct = _usage(reply)
    p.preamble.append(
        _aevent(
            b"message_start",
            {
                "type": "message_start",
                "message": {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": pt,
                        "output_tokens": 1,
                        "cache_creation_input_tokens": reply.cache[0],
                        "cache_read_input_tokens": reply.cache[1],
                    },
                },
            },
        )
    )
    p.preamble.append(_aevent(b"ping", {"type": "ping"}))
    body = p.body
    index = 0

    def delta_prefix(idx: int) -> bytes:
        return b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":' % idx

    def block_stop(idx: int) -> bytes:
        return _aevent(b"content_block_stop", {"type": "content_block_stop", "index": idx})

    if reply.reasoning:
        body.append(
            (
                _aevent(
                    b"content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    },
                ),
                False,
            )
        )
        pre = delta_prefix(index)
        for r in reply.reasoning:
            body.append(
                (_frame(pre + _dumps({"type": "thinking_delta", "thinking": r}) + b"}\n\n"), True)
            )
        body.append(
            (_frame(pre + _dumps({"type": "signature_delta", "signature": "fake-signature"}) + b"}\n\n"), False)
        )
        body.append((block_stop(index), False))
        index += 1
    if reply.tokens:
        body.append(
            (
                _aevent(
                    b"content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                ),
                False,
            )
        )
        pre = delta_prefix(index)
        for t in reply.tokens:
            body.append((_frame(pre + _dumps({"type": "text_delta", "text": t}) + b"}\n\n"), True))
        body.append((block_stop(index), False))
        index += 1
    for tc in reply.tool_calls:
        body.append(
            (
                _aevent(
                    b"content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "tool_use", "id": tc.id, "name": tc.name, "input": {}},
                    },
                ),
                False,
            )
        )
        pre = delta_prefix(index)
        for frag in tc.arguments:
            body.append(
                (_frame(pre + _dumps({"type": "input_json_delta", "partial_json": frag}) + b"}\n\n"), True)
            )
        body.append((block_stop(index), False))
        index += 1

    p.trailer.append(
        _aevent(
            b"message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _anthropic_stop(reply), "stop_sequence": None},
                "usage": {"output_tokens": ct, **({"output_tokens_details": {"thinking_tokens": len(reply.reasoning)}} if reply.reasoning else {})},
            },
        )
    )
    p.trailer.append(_aevent(b"message_stop", {"type": "message_stop"}))
    p.malformed = _frame(
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
        b'"delta": {"type": "text_delta", "text": "x"\n\n'
    )
    p.error = _frame(
        b"event: error\ndata: "
        + _dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        + b"\n\n"
    )
    return p


def _parse_tool_input(arguments: list[str]) -> Any:
    raw = "".join(arguments)
    if not raw:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}


def _openai_completion(rid: str, model: str | None, created: int, reply: Reply) -> dict:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(reply.tokens) if reply.tokens else None,
        "refusal": None,
    }
    if reply.reasoning:
        message["reasoning_content"] = "".join(reply.reasoning)
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": "".join(tc.arguments)}}
            for tc in reply.tool_calls
        ]
    pt, ct = _usage(reply)
    usage: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    if reply.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(reply.reasoning)}
    if reply.cache[1]:
        usage["prompt_tokens_details"] = {"cached_tokens": reply.cache[1]}
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _openai_finish(reply)}],
        "usage": usage,
    }


def _anthropic_message(mid: str, model: str | None, reply: Reply) -> dict:
    content: list[dict] = []
    if reply.reasoning:
        content.append({"type": "thinking", "thinking": "".join(reply.reasoning), "signature": "fake-signature"})
    if reply.tokens:
        content.append({"type": "text", "text": "".join(reply.tokens)})
    for tc in reply.tool_calls:
        content.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": _parse_tool_input(tc.arguments)})
    pt, ct = _usage(reply)
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _anthropic_stop(reply),
        "stop_sequence": None,
        "usage": {
            "input_tokens": pt,
            "output_tokens": ct,
            "cache_creation_input_tokens": reply.cache[0],
            "cache_read_input_tokens": reply.cache[1],
        },
    }


# ------------------------------------------------------------------ connection


class _BadRequest(Exception):
    pass


_MAX_HEAD = 1 << 20
_READ_SIZE = 1 << 16
_HIGH_WATER = 1 << 16


class _Conn:
    """A connection with its own byte buffer.

    At most one ``reader.read()`` is in flight per connection, held in a task
    (``pending_read``).  The request parser awaits it; while a response is being
    written the same task doubles as the watcher that notices the client going
    away (EOF or reset), without losing bytes the client might send meanwhile.
    """

    __slots__ = ("reader", "writer", "buf", "eof", "aborted", "_rt")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False
        self.aborted = False
        self._rt: asyncio.Task | None = None

    async def _read(self) -> bytes:
        try:
            return await self.reader.read(_READ_SIZE)
        except Exception:  # connection reset and the like: same as EOF for us
            return b""

    def pending_read(self) -> asyncio.Task:
        t = self._rt
        if t is None:
            t = self._rt = asyncio.get_running_loop().create_task(self._read())
        return t

    def consume(self) -> bool:
        """Take the result of the finished pending read; False on EOF."""
        t = self._rt
        assert t is not None and t.done()
        self._rt = None
        data = t.result()
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def fill(self) -> bool:
        if self.eof:
            return False
        await self.pending_read()
        return self.consume()

    def cancel_read(self) -> None:
        t, self._rt = self._rt, None
        if t is not None and not t.done():
            t.cancel()


class _Request:
    __slots__ = ("method", "path", "query", "version", "headers", "body", "keep_alive")

    def __init__(self, method, path, query, version, headers, body, keep_alive) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


async def _read_request(conn: _Conn) -> _Request | None:
    buf = conn.buf
    # Tolerate stray CRLFs between requests.
    while True:
        while buf[:2] == b"\r\n":
            del buf[:2]
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            break
        if len(buf) > _MAX_HEAD:
            raise _BadRequest("header too large")
        if not await conn.fill():
            return None
    head = bytes(buf[:i]).decode("latin-1")
    del buf[: i + 4]
    lines = head.split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        raise _BadRequest("bad request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest("bad header line")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = target.partition("?")
    conn_hdr = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in conn_hdr
    else:
        keep_alive = "keep-alive" in conn_hdr

    if headers.get("expect", "").lower() == "100-continue":
        conn.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            while (j := buf.find(b"\r\n")) < 0:
                if not await conn.fill():
                    return None
            size_line = bytes(buf[:j]).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            del buf[: j + 2]
            if size == 0:
                # Trailers until an empty line.
                while True:
                    while (j := buf.find(b"\r\n")) < 0:
                        if not await conn.fill():
                            return None
                    line = bytes(buf[:j])
                    del buf[: j + 2]
                    if not line:
                        break
                break
            while len(buf) < size + 2:
                if not await conn.fill():
                    return None
            parts.append(bytes(buf[:size]))
            del buf[: size + 2]
        body = b"".join(parts)
    else:
        try:
            n = int(headers.get("content-length", "0") or "0")
        except ValueError:
            raise _BadRequest("bad content-length") from None
        while len(buf) < n:
            if not await conn.fill():
                return None
        body = bytes(buf[:n])
        del buf[:n]
    return _Request(method.upper(), path, query, version, headers, body, keep_alive)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---------------------------------------------------------------------- server

_DONE = "done"  # full response written, connection reusable if keep-alive
_DROPPED = "dropped"  # server closed the connection on purpose
_LOST = "lost"  # write failed: the client went away


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        self.host: str = host
        self.port: int = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.base_url = self.url + "/v1"
        self._record = record

        self._cond = threading.Condition()
        self._scripts: dict[str, list[Reply]] = {}
        self._script_pos: dict[str, int] = {}
        self._spec_cache: dict[str, Reply | None] = {}
        self._requests: list[Recorded] = []
        self._other_requests: list[Recorded] = []
        self._open = 0
        self._peak = 0
        self._accepted = 0
        self._ids = itertools.count(1)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_fut: asyncio.Future | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._conns: set[_Conn] = set()
        self._stopped = False

    # ---------------------------------------------------------------- public

    def start(self) -> "FakeUpstream":
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = _new_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._main(ready.set, install_signals=False))
            except BaseException as e:  # pragma: no cover - startup failure
                errors.append(e)
            finally:
                ready.set()
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):  # pragma: no cover
            raise RuntimeError("fake upstream did not start")
        if errors:  # pragma: no cover
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        loop, fut = self._loop, self._stop_fut
        if loop is not None and fut is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None:
            self._thread.join(10)
        if self._loop is None:
            self._sock.close()

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, model: str, replies: list[Reply] | Reply) -> None:
        if isinstance(replies, Reply):
            replies = [replies]
        replies = list(replies)
        if not replies:
            raise ValueError("script needs at least one Reply")
        with self._cond:
            self._scripts[model] = replies
            self._script_pos[model] = 0

    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    @property
    def other_requests(self) -> list[Recorded]:
        """Requests to endpoints other than the two model endpoints (e.g. GET /v1/models, 404s)."""
        with self._cond:
            return list(self._other_requests)

    @property
    def connections_accepted(self) -> int:
        """Extra: TCP connections accepted since start / reset() (keep-alive checks)."""
        return self._accepted

    @property
    def open_streams(self) -> int:
        return self._open

    @property
    def peak_open_streams(self) -> int:
        return self._peak

    def reset(self) -> None:
        with self._cond:
            self._scripts.clear()
            self._script_pos.clear()
            self._requests.clear()
            self._other_requests.clear()
            self._peak = self._open
            self._accepted = 0

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(f"expected {n} requests, got {len(self._requests)} within {timeout}s")
            return list(self._requests)

    def wait_for_client_close(self, recorded: Recorded, timeout: float = 5.0) -> float:
        with self._cond:
            if not self._cond.wait_for(lambda: recorded.client_closed_at is not None, timeout):
                raise TimeoutError(f"client did not close the connection within {timeout}s")
            return recorded.client_closed_at  # type: ignore[return-value]

    def wait_for_finish(self, recorded: Recorded, timeout: float = 5.0) -> Recorded:
        """Extra: block until the server is done with that request (finished, dropped or client-closed)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: recorded.finished_at is not None or recorded.client_closed_at is not None, timeout
            )
            if not ok:
                raise TimeoutError(f"request not finished within {timeout}s")
            return recorded

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        """Extra: block until no response is being written (open_streams == 0)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._open == 0, timeout):
                raise TimeoutError(f"{self._open} streams still open after {timeout}s")

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM (standalone mode)."""
        loop = _new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(on_ready or (lambda: None), install_signals=True))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # ------------------------------------------------------------ internals

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _next_reply(self, model: Any) -> Reply:
        if isinstance(model, str):
            with self._cond:
                items = self._scripts.get(model)
                if items:
                    i = self._script_pos[model]
                    self._script_pos[model] = i + 1
                    return items[min(i, len(items) - 1)]
            try:
                spec = self._spec_cache[model]
            except KeyError:
                spec = self._spec_cache[model] = parse_spec(model)
            if spec is not None:
                return spec
        return _DEFAULT_REPLY

    async def _main(self, on_ready: Callable[[], None], install_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._stop_fut = stop = loop.create_future()
        server = await asyncio.start_server(self._on_conn, sock=self._sock, limit=_READ_SIZE * 4)
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        on_ready()
        try:
            await stop
        finally:
            server.close()
            for conn in list(self._conns):
                conn.writer.transport.abort()
            tasks = list(self._conn_tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.gather(*rest, return_exceptions=True)
            await server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        self._accepted += 1
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # pragma: no cover
            pass
        try:
            while not conn.eof:
                req = await _read_request(conn)
                if req is None:
                    break
                if not await self._dispatch(conn, req):
                    break
        except _BadRequest as e:
            if not writer.transport.is_closing():
                writer.write(
                    _json_response(400, _dumps(_openai_error_body(400, message=str(e))), keep_alive=False)
                )
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            conn.aborted = True
        except RuntimeError:
            # uvloop: write on a transport the peer already reset.
            conn.aborted = True
            if not writer.transport.is_closing():  # pragma: no cover - bug in the fake
                log.exception("fake upstream: unexpected error")
        except asyncio.CancelledError:
            # Shutdown.  Not re-raised: asyncio's start_server callback in 3.11 calls
            # task.exception() on the finished handler task and would log a cancelled one.
            conn.aborted = True
        except Exception:  # pragma: no cover - bug in the fake
            log.exception("fake upstream: unexpected error")
            conn.aborted = True
        finally:
            conn.cancel_read()
            self._conns.discard(conn)
            if task is not None:
                self._conn_tasks.discard(task)
            if conn.aborted:
                writer.transport.abort()
            else:
                writer.close()

    async def _dispatch(self, conn: _Conn, req: _Request) -> bool:
        path = req.path.rstrip("/") or "/"
        if req.method == "POST" and path == "/v1/chat/completions":
            return await self._serve_model(conn, req, "openai")
        if req.method == "POST" and path == "/v1/messages":
            return await self._serve_model(conn, req, "anthropic")

        rec = Recorded(
            path=req.path,
            headers=req.headers,
            body={},
            model=None,
            started_at=time.monotonic(),
            method=req.method,
            query=req.query,
        )
        if req.method == "GET" and path == "/v1/models":
            with self._cond:
                names = list(self._scripts)
            payload = {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "fake-upstream"} for n in names],
            }
            status, body = 200, _dumps(payload)
        else:
            status = 404
            body = _dumps(
                {
                    "error": {
                        "message": f"Unknown request URL: {req.method} {req.path}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "unknown_url",
                    }
                }
            )
        conn.writer.write(_json_response(status, body, req.keep_alive))
        rec.status = status
        rec.finished_at = time.monotonic()
        rec.completed = True
        if self._record:
            with self._cond:
                self._other_requests.append(rec)
                self._cond.notify_all()
        await conn.writer.drain()
        return req.keep_alive

    async def _serve_model(self, conn: _Conn, req: _Request, provider: str) -> bool:
        started = time.monotonic()
        try:
            body = orjson.loads(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError:
            err = _openai_error_body if provider == "openai" else _anthropic_error_body
            conn.writer.write(
                _json_response(400, _dumps(err(400, message="Request body is not valid JSON")), req.keep_alive)
            )
            await conn.writer.drain()
            return req.keep_alive

        model = body.get("model")
        reply = self._next_reply(model)
        rec = Recorded(
            path=req.path,
            headers=req.headers,
            body=body,
            model=model if isinstance(model, str) else None,
            started_at=started,
            method=req.method,
            query=req.query,
            provider=provider,
            stream=body.get("stream") is True,
            reply=reply,
            status=reply.status,
        )
        with self._cond:
            if self._record:
                self._requests.append(rec)
            self._open += 1
            if self._open > self._peak:
                self._peak = self._open
            self._cond.notify_all()

        loop = asyncio.get_running_loop()
        producer = loop.create_task(self._produce(conn, req, rec, reply, provider, body))
        try:
            while True:
                watcher = conn.pending_read()
                await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
                if producer.done():
                    break
                if conn.consume():
                    continue  # client sent bytes mid-response (pipelining); kept in conn.buf
                # EOF or reset: the client went away before we were done.
                producer.cancel()
                self._client_closed(rec)
                conn.aborted = True
                return False

            outcome = producer.result()
            if watcher.done():
                conn.consume()
            if outcome == _LOST:
                self._client_closed(rec)
                conn.aborted = True
                return False
            if outcome == _DROPPED:
                return False
            return req.keep_alive
        finally:
            if not producer.done():
                producer.cancel()
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    def _client_closed(self, rec: Recorded) -> None:
        with self._cond:
            if rec.client_closed_at is None and not rec.completed:
                rec.client_closed_at = time.monotonic()
            self._cond.notify_all()

    def _finished(self, rec: Recorded, completed: bool) -> None:
        with self._cond:
            rec.finished_at = time.monotonic()
            rec.completed = completed
            self._cond.notify_all()

    async def _produce(
        self, conn: _Conn, req: _Request, rec: Recorded, reply: Reply, provider: str, body: dict
    ) -> str:
        try:
            return await self._produce_inner(conn, req, rec, reply, provider, body)
        except (ConnectionError, OSError):
            return _LOST
        except RuntimeError:
            # uvloop raises RuntimeError when writing to a transport the peer already reset.
            if conn.writer.transport.is_closing():
                return _LOST
            raise

    async def _produce_inner(
        self, conn: _Conn, req: _Request, rec: Recorded, reply: Reply, provider: str, body: dict
    ) -> str:
        writer = conn.writer
        keep_alive = req.keep_alive
        model = rec.model
        n = next(self._ids)
        if provider == "openai":
            rid = f"chatcmpl-fake{n:08x}"
            rid_header = "x-request-id"
        else:
            rid = f"msg_fake{n:08x}"
            rid_header = "request-id"
        req_id = f"req_fake{n:08x}"
        fault = reply.fault

        if fault is Fault.HANG:
            await asyncio.Future()  # until the client goes away (or shutdown)

        if reply.status != 200:
            err = _openai_error_body if provider == "openai" else _anthropic_error_body
            extra = [(rid_header, req_id)]
            if reply.retry_after is not None:
                extra.append(("retry-after", reply.retry_after))
            elif reply.status == 429:
                extra.append(("retry-after", "0"))
            writer.write(
                _json_response(
                    reply.status,
                    _dumps(err(reply.status, reply.error_type, reply.error_message)),
                    keep_alive,
                    extra,
                )
            )
            await writer.drain()
            self._finished(rec, True)
            return _DONE

        if not rec.stream:
            return await self._produce_whole(conn, rec, reply, provider, rid, rid_header, req_id, keep_alive)

        if provider == "openai":
            so = body.get("stream_options")
            include_usage = isinstance(so, dict) and so.get("include_usage") is True
            plan = _openai_plan(rid, model, int(time.time()), reply, include_usage)
        else:
            plan = _anthropic_plan(rid, model, reply)

        out: list[bytes] = [_sse_head(keep_alive, rid_header, req_id), *plan.preamble]
        transport = writer.transport

        async def flush() -> None:
            if transport.is_closing():
                raise ConnectionResetError("client went away")
            if out:
                writer.write(b"".join(out))
                out.clear()
            if transport.get_write_buffer_size() > _HIGH_WATER:
                await writer.drain()

        async def fire_fault() -> str | None:
            """Apply the fault; return an outcome if the stream ends here."""
            if fault is Fault.MALFORMED:
                out.append(plan.malformed)
                return None
            if fault is Fault.ERROR_EVENT:
                out.append(plan.error)
                out.append(_TERM)
                await flush()
                await writer.drain()
                self._finished(rec, True)
                return _DONE if keep_alive else _DROPPED
            # DROP: whatever was sent stays sent, then FIN without the terminating chunk.
            await flush()
            await writer.drain()
            writer.close()
            self._finished(rec, False)
            return _DROPPED

        sleep = asyncio.sleep
        clock = time.monotonic
        ttft, delay, fault_after = reply.ttft, reply.delay, reply.fault_after
        # Pacing is deadline based (ttft counted from request arrival), so timer
        # granularity does not accumulate into drift over long streams.
        deadline = rec.started_at
        sent = 0
        fired = fault is None
        for data, is_content in plan.body:
            if is_content:
                wait = ttft if sent == 0 else delay
                if wait > 0:
                    await flush()
                    deadline += wait
                    now = clock()
                    if deadline > now:
                        await sleep(deadline - now)
                    elif now - deadline > wait:
                        deadline = now  # far behind (overloaded): pace from here, no burst
                if not fired and sent == fault_after:
                    fired = True
                    outcome = await fire_fault()
                    if outcome is not None:
                        return outcome
                sent += 1
                if reply.stamp:
                    data = data.replace(STAMP, b"%020d" % time.monotonic_ns())
            out.append(data)
        if sent == 0 and ttft > 0:
            await flush()
            remaining = rec.started_at + ttft - clock()
            if remaining > 0:
                await sleep(remaining)
        if not fired:
            outcome = await fire_fault()
            if outcome is not None:
                return outcome
        out.extend(plan.trailer)
        out.append(_TERM)
        await flush()
        await writer.drain()
        self._finished(rec, True)
        return _DONE if keep_alive else _DROPPED

    async def _produce_whole(
        self,
        conn: _Conn,
        rec: Recorded,
        reply: Reply,
        provider: str,
        rid: str,
        rid_header: str,
        req_id: str,
        keep_alive: bool,
    ) -> str:
        writer = conn.writer
        if reply.ttft > 0:
            await asyncio.sleep(reply.ttft)
        fault = reply.fault
        extra = [(rid_header, req_id)]
        if fault is Fault.ERROR_EVENT:
            status = 500 if provider == "openai" else 529
            if provider == "openai":
                payload = _openai_error_body(status, "server_error", "Overloaded")
            else:
                payload = _anthropic_error_body(status, "overloaded_error", "Overloaded")
            writer.write(_json_response(status, _dumps(payload), keep_alive, extra))
            await writer.drain()
            self._finished(rec, True)
            return _DONE if keep_alive else _DROPPED

        if provider == "openai":
            payload = _openai_completion(rid, rec.model, int(time.time()), reply)
        else:
            payload = _anthropic_message(rid, rec.model, reply)
        data = _dumps(payload)

        if fault is Fault.DROP:
            # Promise the whole body, send half of it, then hang up.
            head = _json_response(200, data, keep_alive, extra)[: -len(data)]
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            writer.close()
            self._finished(rec, False)
            return _DROPPED
        if fault is Fault.MALFORMED:
            data = data[: max(1, len(data) // 2)]

        writer.write(_json_response(200, data, keep_alive, extra))
        await writer.drain()
        self._finished(rec, True)
        return _DONE if keep_alive else _DROPPED


# ------------------------------------------------------------------ standalone


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fake_upstream", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--record", action="store_true", help="keep a record of every request (memory grows)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    fake = FakeUpstream(args.host, args.port, record=args.record)

    def ready() -> None:
        sys.stdout.write(f"READY {fake.url}\n")
        sys.stdout.flush()

    fake.serve_forever(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
