"""CPU per upstream stream: the run loop over the official SDK with httpx2's default transport,
the same with Backstream's lean transport, and a raw asyncio read as the floor.

Everything runs in this process against the fake upstream in another process, so
`time.process_time()` is the gateway side only. Prints ratios to the raw baseline
measured in the same run (this machine is noisy).

    python bench/upstream_read.py [--requests 600] [--concurrency 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import orjson  # noqa: E402
import uvloop  # noqa: E402

from backstream.api_models import ChatRequest  # noqa: E402
from backstream.config import load_settings  # noqa: E402
from backstream.engine import Run  # noqa: E402
from backstream.model_table import ModelTable  # noqa: E402
from backstream.providers import openai as openai_provider  # noqa: E402
from backstream.providers.base import SSEDecoder  # noqa: E402


def engine_path(url: str, spec: str, lean: bool):
    original = openai_provider.sdk_http_client
    if not lean:
        openai_provider.sdk_http_client = lambda timeout: None  # the SDK's default httpx2 client
    try:
        settings = load_settings(
            environ={},
            models=[
                {
                    "name": "fake",
                    "provider": "openai",
                    "base_url": url + "/v1",
                    "model": spec,
                    "max_concurrency": 10_000,
                    "retries": 0,
                }
            ],
        )
        models = ModelTable(settings)
        config = models.resolve("fake")
        models.provider(config)  # built now, with the chosen transport
    finally:
        openai_provider.sdk_http_client = original
    chat = ChatRequest.model_validate(
        {"model": "fake", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}
    )

    async def one() -> int:
        n = 0
        async for event in Run("msg_bench", chat, models, config).events():
            event.frame()
            n += 1
        return n

    return one


def raw_path(url: str, spec: str):
    host, port = url.removeprefix("http://").split(":")
    body = orjson.dumps(
        {"model": spec, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1000}
    )
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % len(body)
    )

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + body)
        decoder, n = SSEDecoder(), 0
        while chunk := await reader.read(65536):
            for _, data in decoder.feed(chunk):
                if data.startswith(b"{"):
                    orjson.loads(data)
                    n += 1
        writer.close()
        return n

    return one


async def measure(fn, total: int, concurrency: int) -> tuple[float, int]:
    gate = asyncio.Semaphore(concurrency)

    async def guarded() -> int:
        async with gate:
            return await fn()

    await asyncio.gather(*(guarded() for _ in range(min(20, total))))  # warm up: imports, pools
    start = time.process_time()
    results = await asyncio.gather(*(guarded() for _ in range(total)))
    return (time.process_time() - start) / total * 1000, results[0]


async def main(args: argparse.Namespace) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_upstream", "--port", "0"], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        url = proc.stdout.readline().decode().split()[1]  # type: ignore[union-attr]
        spec = f"tokens={args.tokens};ttft_ms=0;delay_ms=2"
        paths = {
            "raw asyncio read (floor)": raw_path(url, spec),
            "run loop, SDK, httpx2 default transport": engine_path(url, spec, lean=False),
            "run loop, SDK, lean transport": engine_path(url, spec, lean=True),
        }
        rows = []
        for name, fn in paths.items():
            ms, items = await measure(fn, args.requests, args.concurrency)
            rows.append((name, ms, items))
        base = rows[0][1]
        print(
            f"{args.requests} streams of {args.tokens} tokens, {args.concurrency} at a time; CPU of this process only"
        )
        for name, ms, items in rows:
            print(f"  {name:42s} {ms:6.2f} ms/stream  {ms / base:5.2f}x floor  ({items} items per stream)")
        default, lean = rows[1][1], rows[2][1]
        print(f"lean transport / default transport: {lean / default:.2f}")
        print(
            "RESULT "
            + orjson.dumps(
                {name: round(ms, 3) for name, ms, _ in rows} | {"lean_over_default": round(lean / default, 3)}
            ).decode()
        )
    finally:
        proc.terminate()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    uvloop.run(main(parser.parse_args()))
