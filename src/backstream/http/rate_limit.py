"""Pure ASGI middleware: requests per minute per API key and tenant, counted before any work is done."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import GatewayError
from ..quotas import Quotas
from .authentication import API_PREFIX
from .errors import answer


class RateLimitMiddleware:
    """Counts each `/v1/…` request against its key's and tenant's rate; answers 429 with Retry-After beyond it."""

    def __init__(self, app: ASGIApp, quotas: Quotas) -> None:
        self.app = app
        self.quotas = quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        state = scope["state"]  # set by AuthenticationMiddleware, which runs first
        try:
            await self.quotas.hit(state["principal"], state["tenant"])
        except GatewayError as exc:
            await answer(scope, receive, send, exc)
            return
        await self.app(scope, receive, send)
