"""What the fake answers: the scripted replies, the faults it can inject, and what it recorded.

Nothing here knows about HTTP or a wire format; `openai.py` and `anthropic.py` render a
`Reply`, `server.py` records a `Recorded` per request.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any


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
    # Override the error body of a non-200 reply.
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
    method: str = "POST"
    query: str = ""
    provider: str = ""  # "openai" | "anthropic" | "" (other endpoints)
    stream: bool = False
    reply: Reply | None = None
    status: int | None = None


DEFAULT_REPLY = Reply()


def usage_of(reply: Reply) -> tuple[int, int]:
    """(prompt, completion) tokens: the scripted usage, or one completion token per text token."""
    return reply.usage if reply.usage is not None else (10, len(reply.tokens))


# ------------------------------------------------------------------ spec strings

_SPEC_KEYS = {"tokens", "ttft_ms", "delay_ms", "status", "reasoning", "fault", "fault_after", "finish", "stamp"}


def _spec_pairs(model: str) -> dict[str, str] | None:
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
    return kv


def parse_spec(model: str | None) -> Reply | None:
    """Parse ``"tokens=64;ttft_ms=20;delay_ms=5"`` into a Reply; None if not a spec."""
    if not model or "=" not in model:
        return None
    kv = _spec_pairs(model)
    if kv is None:
        return None
    try:
        return _spec_reply(kv)
    except ValueError:
        return None


def _spec_reply(kv: dict[str, str]) -> Reply:
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
    return reply


# ------------------------------------------------------------------ scripts


class Scripts:
    """Per model, the replies to give in order (the last one repeats); thread-safe.

    Tests script from their thread while the fake's event loop takes replies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, list[Reply]] = {}
        self._pos: dict[str, int] = {}
        self._spec_cache: dict[str, Reply | None] = {}

    def set(self, model: str, replies: list[Reply] | Reply) -> None:
        replies = [replies] if isinstance(replies, Reply) else list(replies)
        if not replies:
            raise ValueError("script needs at least one Reply")
        with self._lock:
            self._replies[model] = replies
            self._pos[model] = 0

    def names(self) -> list[str]:
        with self._lock:
            return list(self._replies)

    def clear(self) -> None:
        with self._lock:
            self._replies.clear()
            self._pos.clear()

    def next(self, model: Any) -> Reply:
        """The scripted reply, else the reply a spec-string model name asks for, else the default."""
        if not isinstance(model, str):
            return DEFAULT_REPLY
        with self._lock:
            items = self._replies.get(model)
            if items:
                i = self._pos[model]
                self._pos[model] = i + 1
                return items[min(i, len(items) - 1)]
        if model not in self._spec_cache:
            self._spec_cache[model] = parse_spec(model)
        return self._spec_cache[model] or DEFAULT_REPLY
