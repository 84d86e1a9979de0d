"""Standalone mode for benchmarks: `python -m tests.support.fake_upstream --port 0`."""

from __future__ import annotations

import argparse
import logging
import sys

from .server import FakeUpstream


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.fake_upstream", description="A scriptable fake LLM upstream."
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--record", action="store_true", help="keep a record of every request (memory grows)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    fake = FakeUpstream(args.host, args.port, record=args.record)

    def ready() -> None:
        # The first stdout line tells the parent process where to connect.
        sys.stdout.write(f"READY {fake.url}\n")
        sys.stdout.flush()

    fake.serve_forever(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
