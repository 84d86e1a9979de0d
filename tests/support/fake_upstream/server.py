"""FakeUpstream: the HTTP/1.1 server (its own event loop thread), routing, recording, the test API."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from . import anthropic, openai
from .conn import READ_SIZE, BadRequest, Conn, Request
from .produce import DROPPED, LOST, produce
from .script import Recorded, Reply, Scripts
from .wire import json_response

log = logging.getLogger(__name__)

_dumps = orjson.dumps
_FORMATS = {"/v1/chat/completions": openai, "/v1/messages": anthropic}


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _cancel_all(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class _Recorder:
    """What the tests observe: recorded requests and open-stream counters, behind one condition."""

    def __init__(self, record: bool) -> None:
        self.record = record
        self.cond = threading.Condition()
        self.requests: list[Recorded] = []
        self.other_requests: list[Recorded] = []
        self.open = 0
        self.peak = 0

    def model_request(self, rec: Recorded) -> None:
        with self.cond:
            if self.record:
                self.requests.append(rec)
            self.open += 1
            self.peak = max(self.peak, self.open)
            self.cond.notify_all()

    def other_request(self, rec: Recorded) -> None:
        if self.record:
            with self.cond:
                self.other_requests.append(rec)
                self.cond.notify_all()

    def stream_closed(self) -> None:
        with self.cond:
            self.open -= 1
            self.cond.notify_all()

    def client_closed(self, rec: Recorded) -> None:
        with self.cond:
            if rec.client_closed_at is None and not rec.completed:
                rec.client_closed_at = time.monotonic()
            self.cond.notify_all()

    def finished(self, rec: Recorded, completed: bool) -> None:
        with self.cond:
            rec.finished_at = time.monotonic()
            rec.completed = completed
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


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

        self._scripts = Scripts()
        self._rec = _Recorder(record)
        self._accepted = 0
        self._ids = itertools.count(1)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop_fut: asyncio.Future | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._conns: set[Conn] = set()
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeUpstream:
        """Serve from a daemon thread with its own event loop (thread mode, for tests)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._run_loop(ready.set, install_signals=False)
            except BaseException as e:  # pragma: no cover - startup failure
                errors.append(e)
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10):  # pragma: no cover
            raise RuntimeError("fake upstream did not start")
        if errors:  # pragma: no cover
            raise errors[0]
        return self

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM (standalone mode)."""
        self._run_loop(on_ready or (lambda: None), install_signals=True)

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

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- test API

    def script(self, model: str, replies: list[Reply] | Reply) -> None:
        self._scripts.set(model, replies)

    @property
    def requests(self) -> list[Recorded]:
        with self._rec.cond:
            return list(self._rec.requests)

    @property
    def other_requests(self) -> list[Recorded]:
        """Requests to endpoints other than the two model endpoints (e.g. GET /v1/models, 404s)."""
        with self._rec.cond:
            return list(self._rec.other_requests)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted since start / reset() (keep-alive checks)."""
        return self._accepted

    @property
    def open_streams(self) -> int:
        return self._rec.open

    @property
    def peak_open_streams(self) -> int:
        return self._rec.peak

    def reset(self) -> None:
        self._scripts.clear()
        with self._rec.cond:
            self._rec.requests.clear()
            self._rec.other_requests.clear()
            self._rec.peak = self._rec.open
            self._accepted = 0

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        if not self._rec.wait(lambda: len(self._rec.requests) >= n, timeout):
            raise TimeoutError(f"expected {n} requests, got {len(self._rec.requests)} within {timeout}s")
        return self.requests

    def wait_for_client_close(self, recorded: Recorded, timeout: float = 5.0) -> float:
        if not self._rec.wait(lambda: recorded.client_closed_at is not None, timeout):
            raise TimeoutError(f"client did not close the connection within {timeout}s")
        return recorded.client_closed_at  # type: ignore[return-value]

    def wait_for_finish(self, recorded: Recorded, timeout: float = 5.0) -> Recorded:
        """Block until the fake is done with that request (finished, dropped or client-closed)."""
        if not self._rec.wait(
            lambda: recorded.finished_at is not None or recorded.client_closed_at is not None, timeout
        ):
            raise TimeoutError(f"request not finished within {timeout}s")
        return recorded

    def wait_until_idle(self, timeout: float = 5.0) -> None:
        """Block until no response is being written (open_streams == 0)."""
        if not self._rec.wait(lambda: self._rec.open == 0, timeout):
            raise TimeoutError(f"{self._rec.open} streams still open after {timeout}s")

    # ---------------------------------------------------------------- event loop

    def _run_loop(self, on_ready: Callable[[], None], install_signals: bool) -> None:
        loop = _new_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(on_ready, install_signals))
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self, on_ready: Callable[[], None], install_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        self._stop_fut = stop = loop.create_future()
        server = await asyncio.start_server(self._on_conn, sock=self._sock, limit=READ_SIZE * 4)
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        on_ready()
        try:
            await stop
        finally:
            server.close()
            await self._shutdown()
            await server.wait_closed()

    async def _shutdown(self) -> None:
        """Abort every connection, then cancel whatever task is left."""
        for conn in list(self._conns):
            conn.writer.transport.abort()
        await _cancel_all(list(self._conn_tasks))
        me = asyncio.current_task()
        await _cancel_all([t for t in asyncio.all_tasks() if t is not me])

    # ---------------------------------------------------------------- connections

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        conn = Conn(reader, writer)
        self._conns.add(conn)
        self._accepted += 1
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # pragma: no cover
            pass
        try:
            await self._serve_conn(conn)
        finally:
            conn.cancel_read()
            self._conns.discard(conn)
            if task is not None:
                self._conn_tasks.discard(task)
            if conn.aborted:
                writer.transport.abort()
            else:
                writer.close()

    async def _serve_conn(self, conn: Conn) -> None:
        """Requests one after the other while the connection is kept alive."""
        writer = conn.writer
        try:
            while not conn.eof:
                req = await conn.read_request()
                if req is None or not await self._dispatch(conn, req):
                    break
        except BadRequest as e:
            if not writer.transport.is_closing():
                writer.write(json_response(400, _dumps(openai.error_body(400, message=str(e))), keep_alive=False))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            conn.aborted = True
        except RuntimeError:
            # uvloop: write on a transport the peer already reset.
            conn.aborted = True
            if not writer.transport.is_closing():  # pragma: no cover - bug in the fake
                log.exception("fake upstream: unexpected error")
        except asyncio.CancelledError:
            # Shutdown. Not re-raised: asyncio's start_server callback in 3.11 calls
            # task.exception() on the finished handler task and would log a cancelled one.
            conn.aborted = True
        except Exception:  # pragma: no cover - bug in the fake
            log.exception("fake upstream: unexpected error")
            conn.aborted = True

    async def _dispatch(self, conn: Conn, req: Request) -> bool:
        """Serve one request; False when the connection must not be reused."""
        path = req.path.rstrip("/") or "/"
        fmt = _FORMATS.get(path) if req.method == "POST" else None
        if fmt is not None:
            return await self._serve_model(conn, req, fmt)
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
            data = [
                {"id": n, "object": "model", "created": 0, "owned_by": "fake-upstream"} for n in self._scripts.names()
            ]
            status, body = 200, _dumps({"object": "list", "data": data})
        else:
            error = {
                "message": f"Unknown request URL: {req.method} {req.path}",
                "type": "invalid_request_error",
                "param": None,
                "code": "unknown_url",
            }
            status, body = 404, _dumps({"error": error})
        conn.writer.write(json_response(status, body, req.keep_alive))
        rec.status, rec.finished_at, rec.completed = status, time.monotonic(), True
        self._rec.other_request(rec)
        await conn.writer.drain()
        return req.keep_alive

    async def _serve_model(self, conn: Conn, req: Request, fmt: Any) -> bool:
        started = time.monotonic()
        try:
            body = orjson.loads(req.body) if req.body else {}
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError:
            conn.writer.write(
                json_response(
                    400, _dumps(fmt.error_body(400, message="Request body is not valid JSON")), req.keep_alive
                )
            )
            await conn.writer.drain()
            return req.keep_alive

        model = body.get("model")
        reply = self._scripts.next(model)
        rec = Recorded(
            path=req.path,
            headers=req.headers,
            body=body,
            model=model if isinstance(model, str) else None,
            started_at=started,
            method=req.method,
            query=req.query,
            provider=fmt.NAME,
            stream=body.get("stream") is True,
            reply=reply,
            status=reply.status,
        )
        self._rec.model_request(rec)
        producer = asyncio.get_running_loop().create_task(
            produce(conn, req, rec, reply, fmt, next(self._ids), self._rec.finished)
        )
        try:
            return await self._watch_client(conn, req, rec, producer)
        finally:
            if not producer.done():
                producer.cancel()
            self._rec.stream_closed()

    async def _watch_client(self, conn: Conn, req: Request, rec: Recorded, producer: asyncio.Task) -> bool:
        """Wait for the response to be written, noticing a client that goes away meanwhile."""
        while True:
            watcher = conn.pending_read()
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
            if producer.done():
                break
            if conn.consume():
                continue  # client sent bytes mid-response (pipelining); parsed and queued
            # EOF or reset: the client went away before we were done.
            producer.cancel()
            self._rec.client_closed(rec)
            conn.aborted = True
            return False
        outcome = producer.result()
        if watcher.done():
            conn.consume()
        if outcome == LOST:
            self._rec.client_closed(rec)
            conn.aborted = True
            return False
        return outcome != DROPPED and req.keep_alive
