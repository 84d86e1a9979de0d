"""CPU cost of the HTTP guards (src/backstream/http_guards.py), in process, no sockets.

Drives uvicorn's HttpToolsProtocol and the guarded subclass with the same byte streams
through an in-memory transport on uvloop, and times SecurityHeaders' send wrapper:

    python bench/http_guards.py [--requests 20000] [--tokens 200000] [--rounds 5]

Prints microseconds per operation (best of the rounds) and a `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from backstream.config import HttpSettings
from backstream.http.connection_guards import guarded_protocol
from backstream.http.security_headers import SecurityHeaders

BODY = b'{"messages":[{"role":"user","content":"' + b"x" * 24 + b'"}]}'
REQUEST = (
    b"POST /v1/messages HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nuser-agent: bench\r\naccept: */*\r\n"
    b"authorization: Bearer bsk_0123456789abcdef0123456789abcdef\r\ncontent-type: application/json\r\n"
    b"x-request-id: bench-1\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
TOKEN = b'id: 7\nevent: text_delta\ndata: {"id":"evt_01","timestamp":1,"message_id":"msg_01","delta":"Hello"}\n\n'


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def can_write_eof(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)


def make_app(tokens_per_request: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for _ in range(tokens_per_request):
            await send({"type": "http.response.body", "body": TOKEN, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def drive(protocol_class: type, requests: int, tokens_per_request: int) -> float:
    """Seconds for `requests` keep-alive requests on one connection, each answered with that many SSE frames."""
    config = Config(make_app(tokens_per_request), lifespan="off", log_level="warning")
    state = ServerState()
    proto = protocol_class(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    proto.connection_made(MemoryTransport())
    started = time.perf_counter()
    for _ in range(requests):
        proto.data_received(REQUEST)
        await asyncio.gather(*state.tasks)
    elapsed = time.perf_counter() - started
    assert state.total_requests == requests, "every request was answered"
    proto.connection_lost(None)
    return elapsed


async def wrapper_cost(messages: int) -> tuple[float, float]:
    """Seconds for `messages` body sends straight to the server, and through SecurityHeaders."""

    async def sink(message: Any) -> None:
        pass

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        message = {"type": "http.response.body", "body": TOKEN, "more_body": True}
        for _ in range(messages):
            await send(message)

    times = []
    for app in (inner, SecurityHeaders(inner)):
        started = time.perf_counter()
        await app({"type": "http", "method": "GET", "path": "/"}, None, sink)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


async def main(args: argparse.Namespace) -> dict[str, float]:
    guarded = guarded_protocol(HttpSettings(max_connections=100))
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, float("inf")), value)

    for _ in range(args.rounds):
        for name, cls in (("uvicorn", HttpToolsProtocol), ("guarded", guarded)):
            keep(f"{name}_request_us", await drive(cls, args.requests, 0) / args.requests * 1e6)
            per = args.tokens // 1000
            keep(f"{name}_stream_token_us", await drive(cls, 1000, per) / (1000 * per) * 1e6)
        bare, wrapped = await wrapper_cost(args.tokens)
        keep("send_bare_us", bare / args.tokens * 1e6)
        keep("send_security_headers_us", wrapped / args.tokens * 1e6)
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--tokens", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=5)
    result = uvloop.run(main(parser.parse_args()))
    print(f"{'measure':<28}{'us/op':>10}")
    for key, value in result.items():
        print(f"{key:<28}{value:>10.3f}")
    print("RESULT " + orjson.dumps(result).decode())
