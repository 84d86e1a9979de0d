"""Typed access to what the app factory installs and what the middleware learns per request.

Routes read `services(request)` instead of untyped `request.app.state.*`, and
`caller(request)` for the principal and tenant the authentication middleware set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from .. import logs
from ..auth import ANONYMOUS, ANONYMOUS_TENANT, Principal
from ..config import Settings
from ..deployment import Deployment
from ..engine import RunOptions
from ..model_table import ModelTable


@dataclass(frozen=True)
class Services:
    """Everything a route may use, built once per app by the factory."""

    settings: Settings
    models: ModelTable
    deployment: Deployment
    options: RunOptions


def install(app: Any, services: Services) -> None:
    app.state.services = services


def services_of(app: Any) -> Services:
    return app.state.services


def services(request: Request) -> Services:
    return services_of(request.app)


def set_caller(scope: Scope, principal: Principal, tenant: str) -> None:
    state = scope.setdefault("state", {})
    state["principal"] = principal
    state["tenant"] = tenant
    logs.bind(tenant=tenant)  # this request's log lines (and the runs it starts) carry it


def principal_of(request: Request) -> Principal:
    return getattr(request.state, "principal", None) or ANONYMOUS


def tenant_of(request: Request) -> str:
    return getattr(request.state, "tenant", None) or ANONYMOUS_TENANT
