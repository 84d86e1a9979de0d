"""context_management: fit a conversation with tool results into the model's context window."""

from __future__ import annotations

from typing import Any

from ..api_models import ChatRequest
from ..config import ModelConfig


def fit(request: ChatRequest, config: ModelConfig) -> tuple[ChatRequest, dict[str, Any] | None]:
    """The request to send and a report of what was dropped (None when nothing was)."""
    return request, None
