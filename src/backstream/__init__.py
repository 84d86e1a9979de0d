"""Backstream: a self-hosted LLM chat gateway with durable background chat streams."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import AsyncClient as AsyncClient
    from .client import BackstreamError as BackstreamError
    from .client import Client as Client

# Everything `backstream.client` exports (errors, Run, StreamEvent) is reachable from here too.
_CLIENT_NAMES = frozenset(
    {
        "Client",
        "AsyncClient",
        "Run",
        "StreamEvent",
        "BackstreamError",
        "APIConnectionError",
        "AuthenticationError",
        "PermissionDeniedError",
        "NotFoundError",
        "ConflictError",
        "RequestTooLargeError",
        "InvalidRequestError",
        "RateLimitError",
        "ServerError",
    }
)


def __getattr__(name: str) -> Any:
    """The client is imported on first use only: `import backstream` (the server does) stays cheap."""
    if name in _CLIENT_NAMES:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
