"""Operations and discovery: liveness, readiness, Prometheus metrics, and the model list.

Health, readiness and metrics need no credentials and reveal no tenant data.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from starlette.responses import Response

from .. import metrics
from ..api_models import ErrorResponse, ModelInfo, ModelList
from .errors import error_response
from .json_response import ORJSONResponse
from .state import services

log = logging.getLogger("backstream.app")

router = APIRouter()


@router.get(
    "/healthz", tags=["operations"], responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}}
)
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> Response:
    """Readiness: the store and every configured provider are usable."""
    s = services(request)
    problems = {f"models.{name}": reason for name, reason in (await s.models.check()).items()}
    store_problem = await s.deployment.store.ping()
    if store_problem:
        problems["store"] = store_problem
    if problems:
        # Unauthenticated: name the component, keep addresses and error texts in the log. A missing
        # key variable's name is configuration, not a secret: it is said.
        public = {
            f"models.{name}": f"not ready: environment variable {var} (api_key_env) is not set"
            for name, var in s.models.missing_keys().items()
        }
        for field, reason in problems.items():
            log.warning("not ready: %s: %s", field, reason)
        details = [
            {"field": field, "message": public.get(field, "not ready"), "type": "not_ready"} for field in problems
        ]
        return error_response(request.scope, 503, "overloaded_error", "not ready", details)
    return ORJSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    tags=["operations"],
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"example": 'backstream_runs_started_total{kind="sync",model="local"} 3.0'}}}
    },
)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics: runs, events, tokens, queue."""
    executor = services(request).deployment.executor
    metrics.ACTIVE_RUNS.set(executor.active)
    metrics.PENDING_RUNS.set(executor.local_pending)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    """The model names and aliases this server routes."""
    models = services(request).models
    data = [
        ModelInfo(
            id=m.name,
            provider=m.provider,
            aliases=m.aliases,
            default=m.name == models.lookup(None).name,
            max_concurrency=m.max_concurrency,
            created=int(STARTED_AT),
            display_name=m.name,
            created_at=_rfc3339(STARTED_AT),
        )
        for m in models.models.values()
    ]
    return ModelList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


STARTED_AT = time.time()  # the table's models exist since the server started


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
