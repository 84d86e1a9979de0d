"""The Python client: `Client` and its asyncio twin `AsyncClient`, with typed errors and events.

Imported lazily by `backstream` (`from backstream import Client`), so the server never loads it.
"""

from .async_client import AsyncClient
from .common import (
    APIConnectionError,
    AuthenticationError,
    BackstreamError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    Run,
    ServerError,
    StreamEvent,
)
from .sync_client import Client

__all__ = [
    "APIConnectionError",
    "AsyncClient",
    "AuthenticationError",
    "BackstreamError",
    "Client",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "Run",
    "ServerError",
    "StreamEvent",
]
