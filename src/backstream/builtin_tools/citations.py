"""Citations: which search results a finished text block draws on (filled in by the citations work)."""

from __future__ import annotations

from typing import Any

from .base import ToolEnv


def enabled(env: ToolEnv) -> bool:
    return False


def cite(text: str, env: ToolEnv) -> list[dict[str, Any]] | None:
    if not enabled(env) or not env.sources:
        return None
    return None
