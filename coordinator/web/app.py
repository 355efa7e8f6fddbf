"""The coordinator's HTTP app: repository files, health, metrics, and the operator seam.

Routes:

- ``/repo/metadata/...`` and ``/repo/targets/...``: the TUF repository
  (:mod:`.repo_files`); the URL devices are given is ``<base>/repo``;
- ``/healthz``: 200 with a JSON summary while the registry answers (``status`` is
  ``degraded`` when the broker link is down: a restart would not fix that), 503 otherwise;
- ``/metrics``: Prometheus text format from the given registry of collectors;
- the routers of :attr:`WebContext.routers`: the operator HTTP API and the dashboard
  are added there (see ``coordinator/serve.py``), with :class:`WebContext` on
  ``app.state.context``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from coordinator.registry import Registry
from coordinator.web.repo_files import repo_files_router

__all__ = ["REPO_PREFIX", "Health", "RouterFactory", "WebContext", "create_app"]

#: Where the repository is served.
REPO_PREFIX: Final = "/repo"


@dataclass(frozen=True)
class Health:
    """What ``/healthz`` reports; ``ok`` false makes it answer 503."""

    ok: bool
    details: dict[str, Any]


@dataclass(frozen=True)
class WebContext:
    """Everything the routes need, passed down once."""

    registry: Registry
    repository_path: Path
    metrics: CollectorRegistry
    health: Callable[[], Health]
    routers: Sequence[APIRouter] = field(default_factory=tuple)
    #: Where the OpenAPI document of the routers is served (``None``: not served).
    openapi_url: str | None = None


#: Builds an extra router (operator API, dashboard) from the context.
RouterFactory = Callable[[WebContext], APIRouter]


def create_app(context: WebContext) -> FastAPI:
    """Return the app; the health callable runs in a worker thread (it may query the DB)."""
    app = FastAPI(
        title="nanofleet coordinator",
        docs_url=None,
        redoc_url=None,
        openapi_url=context.openapi_url,
    )
    app.state.context = context
    app.include_router(repo_files_router(context.repository_path), prefix=REPO_PREFIX)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        health = await anyio.to_thread.run_sync(context.health)
        return JSONResponse(health.details, status_code=200 if health.ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body = await anyio.to_thread.run_sync(generate_latest, context.metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    for router in context.routers:
        app.include_router(router)
    return app
