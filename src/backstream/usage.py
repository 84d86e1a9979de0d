"""Token usage as a run's events report it: the keys, an empty record, and summing steps."""

from __future__ import annotations

from typing import Any

USAGE_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "cache_write_input_tokens",
    "cache_read_input_tokens",
    "thought_tokens",
)


def empty_usage() -> dict[str, int | None]:
    return dict.fromkeys(USAGE_KEYS)


def add_usage(total: dict[str, Any], step: dict[str, Any]) -> None:
    for key in USAGE_KEYS:
        v = step.get(key)
        if v is not None:
            total[key] = (total[key] or 0) + v
