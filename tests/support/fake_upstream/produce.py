"""Writing one model response: error statuses, whole bodies, paced streams, injected faults.

Counting rules for ``Fault.*`` with ``fault_after``: "content chunks" are the reasoning
deltas, text deltas and tool-argument fragments, in the order they are sent. The
preamble (OpenAI role chunk; Anthropic ``message_start``/``ping``) and block bookkeeping
events (``content_block_start``/``stop``, the OpenAI tool-call header chunk,
``signature_delta``) are not counted. The fault fires at the moment content chunk number
``fault_after`` (0-based) would have been sent, i.e. after its ttft/delay wait; if
``fault_after`` is >= the number of content chunks, it fires in place of the closing events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import ModuleType

import orjson

from .conn import Conn, Request
from .script import STAMP, Fault, Recorded, Reply
from .wire import HIGH_WATER, TERM, Plan, json_response, sse_head

DONE = "done"  # full response written, connection reusable if keep-alive
DROPPED = "dropped"  # the fake closed the connection on purpose
LOST = "lost"  # a write failed: the client went away

Finished = Callable[[Recorded, bool], None]  # (record, completed): the response is over

_dumps = orjson.dumps


async def produce(
    conn: Conn, req: Request, rec: Recorded, reply: Reply, fmt: ModuleType, n: int, finished: Finished
) -> str:
    """Answer one model request in wire format `fmt` (openai.py or anthropic.py); returns an outcome."""
    try:
        return await _produce(conn, req, rec, reply, fmt, n, finished)
    except (ConnectionError, OSError):
        return LOST
    except RuntimeError:
        # uvloop raises RuntimeError when writing to a transport the peer already reset.
        if conn.writer.transport.is_closing():
            return LOST
        raise


async def _produce(
    conn: Conn, req: Request, rec: Recorded, reply: Reply, fmt: ModuleType, n: int, finished: Finished
) -> str:
    writer, keep_alive = conn.writer, req.keep_alive
    rid = fmt.response_id(n)
    id_header = (fmt.REQUEST_ID_HEADER, f"req_fake{n:08x}")
    if reply.fault is Fault.HANG:
        await asyncio.Future()  # until the client goes away (or shutdown)
    if reply.status != 200:
        extra = [id_header]
        if reply.retry_after is not None:
            extra.append(("retry-after", reply.retry_after))
        elif reply.status == 429:
            extra.append(("retry-after", "0"))
        writer.write(
            json_response(
                reply.status,
                _dumps(fmt.error_body(reply.status, reply.error_type, reply.error_message)),
                keep_alive,
                extra,
            )
        )
        await writer.drain()
        finished(rec, True)
        return DONE
    if not rec.stream:
        return await _whole(conn, keep_alive, rec, reply, fmt, rid, id_header, finished)
    plan = fmt.stream_plan(rid, rec.model, reply, rec.body)
    sender = _Sender(conn, keep_alive, rec, plan, finished)
    sender.out += [sse_head(keep_alive, *id_header), *plan.preamble]
    return await sender.run(reply)


async def _whole(
    conn: Conn,
    keep_alive: bool,
    rec: Recorded,
    reply: Reply,
    fmt: ModuleType,
    rid: str,
    id_header: tuple[str, str],
    finished: Finished,
) -> str:
    writer = conn.writer
    if reply.ttft > 0:
        await asyncio.sleep(reply.ttft)
    extra = [id_header]
    if reply.fault is Fault.ERROR_EVENT:
        status, payload = fmt.overloaded()
        writer.write(json_response(status, _dumps(payload), keep_alive, extra))
        await writer.drain()
        finished(rec, True)
        return DONE if keep_alive else DROPPED
    data = _dumps(fmt.whole(rid, rec.model, reply))
    if reply.fault is Fault.DROP:
        # Promise the whole body, send half of it, then hang up.
        head = json_response(200, data, keep_alive, extra)[: -len(data)]
        writer.write(head + data[: len(data) // 2])
        await writer.drain()
        writer.close()
        finished(rec, False)
        return DROPPED
    if reply.fault is Fault.MALFORMED:
        data = data[: max(1, len(data) // 2)]
    writer.write(json_response(200, data, keep_alive, extra))
    await writer.drain()
    finished(rec, True)
    return DONE if keep_alive else DROPPED


class _Sender:
    """Sends a Plan chunk by chunk, batching the chunks that are due at the same moment."""

    def __init__(self, conn: Conn, keep_alive: bool, rec: Recorded, plan: Plan, finished: Finished) -> None:
        self.writer = conn.writer
        self.keep_alive = keep_alive
        self.rec = rec
        self.plan = plan
        self.finished = finished
        self.out: list[bytes] = []
        self.deadline = rec.started_at

    async def flush(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            raise ConnectionResetError("client went away")
        if self.out:
            self.writer.write(b"".join(self.out))
            self.out.clear()
        if transport.get_write_buffer_size() > HIGH_WATER:
            await self.writer.drain()

    async def end(self, completed: bool, close: bool = False) -> str:
        """Send what is pending and mark the response over."""
        await self.flush()
        await self.writer.drain()
        if close:
            self.writer.close()
        self.finished(self.rec, completed)
        return DONE if self.keep_alive and not close else DROPPED

    async def fire(self, fault: Fault) -> str | None:
        """Apply the fault; return an outcome if the stream ends here."""
        if fault is Fault.MALFORMED:
            self.out.append(self.plan.malformed)
            return None
        if fault is Fault.ERROR_EVENT:
            self.out += [self.plan.error, TERM]
            return await self.end(True)
        # DROP: whatever was sent stays sent, then FIN without the terminating chunk.
        return await self.end(False, close=True)

    async def pace(self, wait: float) -> None:
        """Sleep until the next content chunk is due, `wait` after the previous one."""
        if wait <= 0:
            return
        await self.flush()
        self.deadline += wait
        now = time.monotonic()
        if self.deadline > now:
            await asyncio.sleep(self.deadline - now)
        elif now - self.deadline > wait:
            self.deadline = now  # far behind (overloaded): pace from here, no burst

    async def run(self, reply: Reply) -> str:
        ttft, fault, fault_after = reply.ttft, reply.fault, reply.fault_after
        # Pacing is deadline based (ttft counted from request arrival), so timer
        # granularity does not accumulate into drift over long streams.
        self.deadline = self.rec.started_at
        sent = 0
        fired = fault is None
        for data, is_content in self.plan.body:
            if is_content:
                await self.pace(ttft if sent == 0 else reply.delay)
                if not fired and sent == fault_after:
                    fired = True
                    outcome = await self.fire(fault)  # type: ignore[arg-type]
                    if outcome is not None:
                        return outcome
                sent += 1
                if reply.stamp:
                    data = data.replace(STAMP, b"%020d" % time.monotonic_ns())
            self.out.append(data)
        if sent == 0 and ttft > 0:
            await self.flush()
            remaining = self.rec.started_at + ttft - time.monotonic()
            if remaining > 0:
                await asyncio.sleep(remaining)
        if not fired:
            outcome = await self.fire(fault)  # type: ignore[arg-type]
            if outcome is not None:
                return outcome
        self.out += [*self.plan.trailer, TERM]
        return await self.end(True)
