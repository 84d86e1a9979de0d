"""The app factory: builds the deployment, installs the middleware stack, the error handlers and the surfaces."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__, metrics
from ..auth import Authenticator
from ..config import Settings
from ..deployment import build_deployment
from ..engine import RunOptions
from ..model_table import ModelTable
from ..quotas import Quotas
from ..store import StreamStore
from . import background_runs, chat_completions, messages, operations, responses
from .access_log import AccessLogMiddleware
from .authentication import AuthenticationMiddleware
from .body_limit import BodyLimitMiddleware
from .direct_body_send import DirectBodySend
from .docs import install_docs
from .errors import install_error_handlers
from .json_response import ORJSONResponse
from .openapi import install_openapi
from .playground import router as playground_router
from .rate_limit import RateLimitMiddleware
from .request_id import RequestIdMiddleware
from .security_headers import SecurityHeaders, add_cors
from .state import Services, install
from .store_outage import StoreOutageGuard
from .tracing import install_tracing

SWITCH_INTERVAL_S = 0.0005  # how long a thread may hold the GIL while another waits (Python's default: 5 ms)


def create_app(settings: Settings) -> FastAPI:
    metrics.configure(tenant_labels=settings.metrics.tenant_labels)
    models = ModelTable(settings)
    deployment = build_deployment(settings, models)
    store = deployment.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.open()
        await deployment.start()
        # Everything imported so far lives as long as the process: keep the collector off it,
        # and collect young objects less often (each token allocates a few).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
        # The store's threads (SQLite reader and writer) and the local model's hand results back through
        # the GIL; while the event loop is busy each hand-back waited out the switch interval (5 ms):
        # reading 12 events beside a busy loop took 25 ms, 0.6 ms at 0.5 ms.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            yield
        finally:
            await deployment.stop()
            await store.close()
            await models.aclose()

    app = FastAPI(
        title="Backstream",
        version=__version__,
        description="Self-hosted LLM chat gateway with durable background chat streams.",
        lifespan=lifespan,
        default_response_class=ORJSONResponse,
        docs_url=None,  # http/docs.py serves /docs and /redoc with packaged assets
        redoc_url=None,
    )
    install(app, Services(settings, models, deployment, RunOptions.from_settings(settings)))
    _install_middleware(app, settings, deployment.quotas, store)
    install_error_handlers(app)
    install_openapi(app)
    install_docs(app)
    app.include_router(operations.router)
    app.include_router(messages.router)
    app.include_router(background_runs.router)
    app.include_router(playground_router)  # /playground and / (a page; its calls go through /v1/)
    app.include_router(chat_completions.router)  # wire dialects: adapters over the same runs
    app.include_router(responses.router)
    return app


def _install_middleware(app: FastAPI, settings: Settings, quotas: Quotas, store: StreamStore) -> None:
    """Added innermost first; a request passes them in the reverse order:
    direct body send → (tracing →) access log → CORS → security headers → store outage → request id → authentication → rate limit → body limit."""
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.limits.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, quotas=quotas)  # needs the caller: inside authentication
    app.add_middleware(AuthenticationMiddleware, authenticator=Authenticator(settings.auth))
    app.add_middleware(RequestIdMiddleware)  # outside every answer of ours: they all carry the id
    app.add_middleware(StoreOutageGuard, store=store)  # outside auth and rate limits, which read the store
    app.add_middleware(SecurityHeaders)  # response headers and CORS wrap everything, preflights bypass auth
    add_cors(app, settings.cors)
    app.add_middleware(AccessLogMiddleware, enabled=settings.log.access)  # every answer, once it ended
    install_tracing(app, settings)  # when on, outermost: the request's span (under its traceparent) is current
    app.add_middleware(DirectBodySend)  # outermost: SSE frames skip the start-only send wrappers above
