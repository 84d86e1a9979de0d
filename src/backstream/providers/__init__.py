"""Model providers: each turns a validated request into a stream of normalised deltas."""

from __future__ import annotations

from ..config import ModelConfig
from .base import Delta, Provider, UpstreamError


def create_provider(config: ModelConfig) -> Provider:
    if config.provider == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(config)
    if config.provider == "anthropic":
        from .anthropic import AnthropicProvider

        return AnthropicProvider(config)
    from .local import LocalProvider

    return LocalProvider(config)


__all__ = ["Delta", "Provider", "UpstreamError", "create_provider"]
