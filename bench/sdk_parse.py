"""What the official SDKs' typed streaming costs per chunk, versus Backstream's lean parsing.

Builds N realistic SSE events in memory (OpenAI `chat.completion.chunk` lines and
Anthropic `content_block_delta` events, with the usual preamble and trailer) and times:

  SDK path    the SDK's own `Stream` / `AsyncStream` over an `httpx2.Response` fed those
              bytes, one event per network read: its SSE decoder, `json.loads`, then
              `client._process_response_data` (construct_type) building a typed object per
              event. Also, from an already parsed dict: `_process_response_data` alone,
              `Model.construct(**d)` and `Model.model_validate(d)`.
  lean path   what Backstream does: `SSEDecoder().feed(bytes)` + `orjson.loads` +
              `openai.chunk_deltas(d)` / `AnthropicStreamParser().deltas(kind, d)`.

Nothing touches the network. Prints microseconds per event (best of --repeat runs)
and the ratio to the lean counterpart, then one `RESULT {json}` line.

    python bench/sdk_parse.py              # N=20000, a few seconds
    python bench/sdk_parse.py -n 5000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anthropic  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402
import orjson  # noqa: E402
from anthropic.types import (  # noqa: E402
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
)
from openai.types.chat import ChatCompletionChunk  # noqa: E402

from _common import fmt, source_version, table  # noqa: E402
from backstream.providers.anthropic import AnthropicStreamParser  # noqa: E402
from backstream.providers.base import SSEDecoder  # noqa: E402
from backstream.providers.openai import chunk_deltas  # noqa: E402

_ANTHROPIC_CLASSES = {
    "message_start": RawMessageStartEvent,
    "message_delta": RawMessageDeltaEvent,
    "message_stop": RawMessageStopEvent,
    "content_block_start": RawContentBlockStartEvent,
    "content_block_delta": RawContentBlockDeltaEvent,
    "content_block_stop": RawContentBlockStopEvent,
}

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "an",
    "are",
    "from",
    "or",
    "have",
    "not",
    "but",
    "which",
    "they",
    "you",
    "one",
    "river",
    "stream",
    "water",
    "flows",
    "gently",
    "under",
    "bridges",
    "through",
    "valleys",
    "toward",
    "distant",
    "seas",
    "carrying",
    "stories",
    "of",
    "mountains",
    "rain",
    "snow",
    "and",
    "time",
    "itself",
    "quietly",
]


def _tokens(n: int, seed: int = 7) -> list[str]:
    """Token texts shaped like real BPE output: mostly ' word', some punctuation and word pieces."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        w = rng.choice(_WORDS)
        if r < 0.75:
            out.append(" " + w)
        elif r < 0.85:
            out.append(rng.choice([",", ".", ";", ":", "!", "?", "\n\n", "\n"]))
        elif r < 0.95:
            out.append(w[: max(1, len(w) // 2)])
        else:
            out.append(" \u00e9t\u00e9" if r < 0.97 else " \u201cquoted\u201d")
    return out


# ------------------------------------------------------------------ wire data


def openai_events(n: int) -> tuple[list[bytes], str]:
    """`data: {chunk}\\n\\n` events as OpenAI sends them (n content chunks), and the expected text."""
    toks = _tokens(n)
    base = {
        "id": "chatcmpl-BXq4k1J5ZgQm2T7nA9vYzR0sLwE3c",
        "object": "chat.completion.chunk",
        "created": 1761234567,
        "model": "gpt-4.1-mini-2025-04-14",
        "service_tier": "default",
        "system_fingerprint": "fp_6f2eabb9a5",
    }

    def ev(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    out = [
        ev(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            usage=None,
            obfuscation="Xy3k",
        )
    ]
    for i, t in enumerate(toks):
        out.append(
            ev(
                [{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None}],
                usage=None,
                obfuscation="ab12cd"[: 1 + i % 6],
            )
        )
    out.append(ev([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], usage=None, obfuscation="q9"))
    out.append(
        ev(
            [],
            usage={
                "prompt_tokens": 42,
                "completion_tokens": n,
                "total_tokens": 42 + n,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            obfuscation="Zk",
        )
    )
    out.append(b"data: [DONE]\n\n")
    return out, "".join(toks)


def anthropic_events(n: int) -> tuple[list[bytes], str]:
    """`event: X\\ndata: {...}\\n\\n` events as Anthropic sends them (n text deltas), and the expected text."""
    toks = _tokens(n)

    def ev(name: str, payload: dict[str, Any]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    out = [
        ev(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-sonnet-4-5-20250929",
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": 42,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 1,
                        "service_tier": "standard",
                    },
                },
            },
        ),
        ev(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        ev("ping", {"type": "ping"}),
    ]
    for t in toks:
        out.append(
            ev(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
            )
        )
    out.append(ev("content_block_stop", {"type": "content_block_stop", "index": 0}))
    out.append(
        ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": n},
            },
        )
    )
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out, "".join(toks)


def split_events(events: list[bytes]) -> list[tuple[bytes, dict[str, Any] | None]]:
    """(event name, parsed data) per event, for the parse-only measurements."""
    out = []
    for raw in events:
        kind = b""
        data = b""
        for line in raw.split(b"\n"):
            if line.startswith(b"event: "):
                kind = line[7:]
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((kind, None if data == b"[DONE]" else orjson.loads(data)))
    return out


# ------------------------------------------------------------------ timing


# A measurement stops repeating once it has used this much time (it always runs once),
# so the slow SDK paths do not stretch the run to half a minute.
BUDGET_S = 0.4


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of up to `repeat` runs (seconds) and the last result."""
    best = float("inf")
    spent = 0.0
    result = None
    gc.collect()
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        took = time.perf_counter() - t0
        best = min(best, took)
        spent += took
        if spent > BUDGET_S:
            break
    return best, result


def run_async(coro_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Turn an async benchmark body into a sync one run on a fresh event loop (loop setup not timed)."""

    def go() -> Any:
        loop = asyncio.new_event_loop()
        try:
            t0 = time.perf_counter()
            result = loop.run_until_complete(coro_fn())
            go.elapsed = time.perf_counter() - t0  # type: ignore[attr-defined]
            return result
        finally:
            # The SDK stream leaves its inner SSE generator suspended after [DONE]; finalise it.
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return go


def best_of_async(coro_fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    go = run_async(coro_fn)
    best = float("inf")
    spent = 0.0
    result = None
    gc.collect()
    for _ in range(repeat):
        result = go()
        best = min(best, go.elapsed)  # type: ignore[attr-defined]
        spent += go.elapsed  # type: ignore[attr-defined]
        if spent > BUDGET_S:
            break
    return best, result


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


# ------------------------------------------------------------------ OpenAI


def bench_openai(n: int, repeat: int) -> dict[str, Any]:
    wire, expected = openai_events(n)
    parsed = [d for _, d in split_events(wire) if d is not None]
    count = len(wire)
    gc.freeze()  # the inputs live for the whole benchmark: keep them out of the collector's way
    client = openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1", max_retries=0)
    aclient = openai.AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1", max_retries=0)
    response = httpx2.Response(200)
    process = client._process_response_data

    def sdk_stream() -> str:
        stream = openai.Stream(
            cast_to=ChatCompletionChunk, response=httpx2.Response(200, content=iter(wire)), client=client
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    async def sdk_astream() -> str:
        stream = openai.AsyncStream(
            cast_to=ChatCompletionChunk, response=httpx2.Response(200, content=_aiter(wire)), client=aclient
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    def lean() -> str:
        decoder = SSEDecoder()
        parts = []
        for raw in wire:
            for _event, data in decoder.feed(raw):
                if data == b"[DONE]":
                    break
                for d in chunk_deltas(orjson.loads(data)):
                    if d[0] == "text":
                        parts.append(d[1])
        return "".join(parts)

    async def lean_deltas(source: AsyncIterator[bytes]) -> AsyncIterator[tuple[Any, ...]]:
        # The shape of OpenAIProvider.stream: an async generator over the body's raw reads.
        decoder = SSEDecoder()
        async for raw in source:
            for _event, data in decoder.feed(raw):
                if data == b"[DONE]":
                    return
                for d in chunk_deltas(orjson.loads(data)):
                    yield d

    async def lean_async() -> str:
        return "".join([d[1] async for d in lean_deltas(_aiter(wire)) if d[0] == "text"])

    def sdk_decode_only() -> int:
        k = 0
        for sse in openai._streaming.SSEDecoder().iter_bytes(iter(wire)):
            if sse.data.startswith("[DONE]"):
                break
            sse.json()
            k += 1
        return k

    def lean_decode_only() -> int:
        decoder = SSEDecoder()
        k = 0
        for raw in wire:
            for _event, data in decoder.feed(raw):
                if data == b"[DONE]":
                    break
                orjson.loads(data)
                k += 1
        return k

    def sdk_process() -> None:
        for d in parsed:
            process(data=d, cast_to=ChatCompletionChunk, response=response)

    def sdk_construct() -> None:
        for d in parsed:
            ChatCompletionChunk.construct(**d)

    def sdk_validate() -> None:
        for d in parsed:
            ChatCompletionChunk.model_validate(d)

    def lean_objects() -> None:
        for d in parsed:
            chunk_deltas(d)

    rows: dict[str, dict[str, Any]] = {}

    def measure(
        name: str,
        fn: Callable[[], Any],
        baseline: str | None,
        group: str,
        check: str | None = None,
        is_async: bool = False,
        per: int | None = None,
    ) -> None:
        t, result = (best_of_async if is_async else best_of)(fn, repeat)
        if check is not None and result != check:
            raise AssertionError(f"{name}: parsed text differs from what was sent")
        rows[name] = {"group": group, "us_per_event": 1e6 * t / (per or count), "baseline": baseline}

    e2e = "end to end, wire bytes -> result (one event per read)"
    obj = "from a parsed dict: build the result"
    dec = "decode only: SSE framing + JSON"
    measure("lean: SSEDecoder.feed + orjson.loads + chunk_deltas", lean, None, e2e, expected)
    measure("lean, in an async generator like OpenAIProvider.stream", lean_async, None, e2e, expected, is_async=True)
    measure(
        "sdk: openai.Stream -> ChatCompletionChunk",
        sdk_stream,
        "lean: SSEDecoder.feed + orjson.loads + chunk_deltas",
        e2e,
        expected,
    )
    measure(
        "sdk: openai.AsyncStream -> ChatCompletionChunk",
        sdk_astream,
        "lean, in an async generator like OpenAIProvider.stream",
        e2e,
        expected,
        is_async=True,
    )
    measure("lean: chunk_deltas(d)", lean_objects, None, obj, per=len(parsed))
    measure(
        "sdk: client._process_response_data (construct_type)",
        sdk_process,
        "lean: chunk_deltas(d)",
        obj,
        per=len(parsed),
    )
    measure("ChatCompletionChunk.construct(**d)", sdk_construct, "lean: chunk_deltas(d)", obj, per=len(parsed))
    measure("ChatCompletionChunk.model_validate(d)", sdk_validate, "lean: chunk_deltas(d)", obj, per=len(parsed))
    measure("lean: SSEDecoder.feed + orjson.loads", lean_decode_only, None, dec)
    measure("sdk: SSEDecoder.iter_bytes + sse.json()", sdk_decode_only, "lean: SSEDecoder.feed + orjson.loads", dec)
    return {"events": count, "bytes": sum(map(len, wire)), "rows": rows}


# ------------------------------------------------------------------ Anthropic


def bench_anthropic(n: int, repeat: int) -> dict[str, Any]:
    wire, expected = anthropic_events(n)
    parsed = [(k, d) for k, d in split_events(wire) if d is not None]
    typed = [(k, d) for k, d in parsed if d.get("type") in _ANTHROPIC_CLASSES]  # what the SDK turns into objects
    count = len(wire)
    gc.freeze()
    client = anthropic.Anthropic(api_key="x", base_url="http://127.0.0.1:9", max_retries=0)
    aclient = anthropic.AsyncAnthropic(api_key="x", base_url="http://127.0.0.1:9", max_retries=0)
    response = httpx2.Response(200)
    process = client._process_response_data

    def text_of(ev: Any) -> str:
        if ev.type == "content_block_delta" and ev.delta.type == "text_delta":
            return ev.delta.text
        return ""

    def sdk_stream() -> str:
        stream = anthropic.Stream(
            cast_to=RawMessageStreamEvent, response=httpx2.Response(200, content=iter(wire)), client=client
        )
        return "".join(text_of(ev) for ev in stream)

    async def sdk_astream() -> str:
        stream = anthropic.AsyncStream(
            cast_to=RawMessageStreamEvent, response=httpx2.Response(200, content=_aiter(wire)), client=aclient
        )
        return "".join([text_of(ev) async for ev in stream])

    def lean() -> str:
        decoder = SSEDecoder()
        parser = AnthropicStreamParser()
        parts = []
        for raw in wire:
            for kind, data in decoder.feed(raw):
                for d in parser.deltas(kind, orjson.loads(data)):
                    if d[0] == "text":
                        parts.append(d[1])
        return "".join(parts)

    async def lean_deltas(source: AsyncIterator[bytes]) -> AsyncIterator[tuple[Any, ...]]:
        # The shape of AnthropicProvider.stream.
        decoder = SSEDecoder()
        parser = AnthropicStreamParser()
        async for raw in source:
            for kind, data in decoder.feed(raw):
                for d in parser.deltas(kind, orjson.loads(data)):
                    yield d
                if kind == b"message_stop":
                    return

    async def lean_async() -> str:
        return "".join([d[1] async for d in lean_deltas(_aiter(wire)) if d[0] == "text"])

    def sdk_decode_only() -> int:
        k = 0
        for sse in anthropic._streaming.SSEDecoder().iter_bytes(iter(wire)):
            if sse.data:
                sse.json()
            k += 1
        return k

    def lean_decode_only() -> int:
        decoder = SSEDecoder()
        k = 0
        for raw in wire:
            for _kind, data in decoder.feed(raw):
                orjson.loads(data)
                k += 1
        return k

    def sdk_process() -> None:
        for _k, d in typed:
            process(data=d, cast_to=RawMessageStreamEvent, response=response)

    def sdk_construct() -> None:
        for _k, d in typed:
            _ANTHROPIC_CLASSES[d["type"]].construct(**d)

    def sdk_validate() -> None:
        for _k, d in typed:
            _ANTHROPIC_CLASSES[d["type"]].model_validate(d)

    def lean_objects() -> None:
        parser = AnthropicStreamParser()
        for k, d in parsed:
            parser.deltas(k, d)

    rows: dict[str, dict[str, Any]] = {}

    def measure(
        name: str,
        fn: Callable[[], Any],
        baseline: str | None,
        group: str,
        check: str | None = None,
        is_async: bool = False,
        per: int | None = None,
    ) -> None:
        t, result = (best_of_async if is_async else best_of)(fn, repeat)
        if check is not None and result != check:
            raise AssertionError(f"{name}: parsed text differs from what was sent")
        rows[name] = {"group": group, "us_per_event": 1e6 * t / (per or count), "baseline": baseline}

    e2e = "end to end, wire bytes -> result (one event per read)"
    obj = "from a parsed dict: build the result"
    dec = "decode only: SSE framing + JSON"
    measure("lean: SSEDecoder.feed + orjson.loads + AnthropicStreamParser.deltas", lean, None, e2e, expected)
    measure("lean, in an async generator like AnthropicProvider.stream", lean_async, None, e2e, expected, is_async=True)
    measure(
        "sdk: anthropic.Stream -> RawMessageStreamEvent",
        sdk_stream,
        "lean: SSEDecoder.feed + orjson.loads + AnthropicStreamParser.deltas",
        e2e,
        expected,
    )
    measure(
        "sdk: anthropic.AsyncStream -> RawMessageStreamEvent",
        sdk_astream,
        "lean, in an async generator like AnthropicProvider.stream",
        e2e,
        expected,
        is_async=True,
    )
    measure("lean: AnthropicStreamParser.deltas(kind, d)", lean_objects, None, obj, per=len(parsed))
    measure(
        "sdk: client._process_response_data (construct_type on the union)",
        sdk_process,
        "lean: AnthropicStreamParser.deltas(kind, d)",
        obj,
        per=len(typed),
    )
    measure(
        "Raw*Event.construct(**d) (variant picked by type)",
        sdk_construct,
        "lean: AnthropicStreamParser.deltas(kind, d)",
        obj,
        per=len(typed),
    )
    measure(
        "Raw*Event.model_validate(d) (variant picked by type)",
        sdk_validate,
        "lean: AnthropicStreamParser.deltas(kind, d)",
        obj,
        per=len(typed),
    )
    measure("lean: SSEDecoder.feed + orjson.loads", lean_decode_only, None, dec)
    measure("sdk: SSEDecoder.iter_bytes + sse.json()", sdk_decode_only, "lean: SSEDecoder.feed + orjson.loads", dec)
    return {"events": count, "bytes": sum(map(len, wire)), "rows": rows}


# ------------------------------------------------------------------ main


def render(title: str, res: dict[str, Any]) -> str:
    rows = res["rows"]
    out = [f"{title}: {res['events']} events, {res['bytes'] / res['events']:.0f} bytes each on average"]
    body = []
    group = None
    for name, r in rows.items():
        if r["group"] != group:
            group = r["group"]
            body.append([f"[{group}]", "", ""])
        base = rows.get(r["baseline"]) if r["baseline"] else None
        ratio = r["us_per_event"] / base["us_per_event"] if base else None
        r["ratio_to_lean"] = ratio
        body.append(["  " + name, fmt(r["us_per_event"], 2), f"{ratio:.1f}x" if ratio else "(lean)"])
    out.append(table(["", "us/event", "vs lean"], body))
    return "\n".join(out)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--events", type=int, default=20000, help="content events per stream (default 20000)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help=f"runs per measurement, the best is kept; slow ones stop after {BUDGET_S} s (default 5)",
    )
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    # Warm the SDKs' caches (model field info, discriminators) so steady-state cost is measured.
    bench_openai(200, 1)
    bench_anthropic(200, 1)
    # The SDKs' imports leave a large heap; freeze it so that neither our gc.collect()
    # between runs nor the collector's own full passes walk it over and over.
    gc.collect()
    gc.freeze()
    o = bench_openai(args.events, args.repeat)
    a = bench_anthropic(args.events, args.repeat)
    print(
        f"sdk_parse: openai {openai.__version__}, anthropic {anthropic.__version__}, pydantic "
        f"{__import__('pydantic').VERSION}, orjson {orjson.__version__}; best of up to {args.repeat} runs; "
        f"source {source_version()}"
    )
    print()
    print(render("OpenAI chat.completion.chunk", o))
    print()
    print(render("Anthropic Messages stream", a))

    def head(res: dict[str, Any], sdk: str, lean: str) -> dict[str, float]:
        r = res["rows"]
        return {
            "sdk_us": r[sdk]["us_per_event"],
            "lean_us": r[lean]["us_per_event"],
            "ratio": r[sdk]["us_per_event"] / r[lean]["us_per_event"],
        }

    summary = {
        "openai_stream": head(
            o, "sdk: openai.Stream -> ChatCompletionChunk", "lean: SSEDecoder.feed + orjson.loads + chunk_deltas"
        ),
        "openai_async_stream": head(
            o,
            "sdk: openai.AsyncStream -> ChatCompletionChunk",
            "lean, in an async generator like OpenAIProvider.stream",
        ),
        "anthropic_stream": head(
            a,
            "sdk: anthropic.Stream -> RawMessageStreamEvent",
            "lean: SSEDecoder.feed + orjson.loads + AnthropicStreamParser.deltas",
        ),
        "anthropic_async_stream": head(
            a,
            "sdk: anthropic.AsyncStream -> RawMessageStreamEvent",
            "lean, in an async generator like AnthropicProvider.stream",
        ),
    }
    print()
    for k, v in summary.items():
        print(f"{k:<24} sdk {v['sdk_us']:6.2f} us/event   lean {v['lean_us']:5.2f} us/event   {v['ratio']:.1f}x")
    print(f"(took {time.perf_counter() - t0:.1f} s)")
    result = {
        "source": source_version(),
        "events": args.events,
        "repeat": args.repeat,
        "summary": summary,
        "openai": o["rows"],
        "anthropic": a["rows"],
    }
    print("RESULT " + json.dumps(_rounded(result), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
