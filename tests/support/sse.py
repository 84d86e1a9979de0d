"""Server-sent events as the tests read them: frames {id, event, data} with the data decoded."""

from __future__ import annotations

from typing import Any

import orjson


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Frames as dicts {id, event, data}; checks each frame has exactly one data line."""
    frames = []
    for block in raw.split(b"\n\n"):
        if not block.strip() or block.startswith(b":"):
            continue  # keepalive comments are not events
        frame: dict[str, Any] = {}
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            key, _, value = line.partition(b": ")
            assert key.decode() not in frame, f"repeated field {key!r} in frame {block!r}"
            frame[key.decode()] = value.decode()
        frame["id"] = int(frame["id"])
        frame["data"] = orjson.loads(frame["data"])
        frames.append(frame)
    return frames


def parse_sse_prefix(buf: bytes) -> list[dict[str, Any]]:
    """The complete frames at the start of a body still arriving (the partial last one is left out)."""
    if b"\n\n" not in buf:
        return []
    return parse_sse(buf.rsplit(b"\n\n", 1)[0] + b"\n\n")


def event_types(frames: list[dict[str, Any]]) -> list[str]:
    return [f["event"] for f in frames]
