"""Pure ASGI middleware: who calls `/v1/…` and for which tenant, before any work is done."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import Authenticator
from ..errors import GatewayError
from .errors import answer
from .state import set_caller

API_PREFIX = "/v1/"  # health, readiness, metrics and the docs need no credentials


class AuthenticationMiddleware:
    """Authenticates the caller and resolves the tenant (X-Tenant or the default); answers 401/403/422 itself."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            principal = await self.authenticator.authenticate(_credentials(headers))
            tenant = self.authenticator.tenant_for(principal, _header(headers, b"x-tenant"))
        except GatewayError as exc:
            await answer(scope, receive, send, exc)
            return
        set_caller(scope, principal, tenant)
        await self.app(scope, receive, send)


def _credentials(headers: dict[bytes, bytes]) -> str | None:
    """`Authorization`, or else `x-api-key` (how the Anthropic SDK sends its key) as a bearer token."""
    authorization = _header(headers, b"authorization")
    if authorization is None and (key := _header(headers, b"x-api-key")) is not None:
        return "Bearer " + key
    return authorization


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")
