"""The routes every Pagoda server answers for its operators, whatever its protocol: GET /health
(200 while the engine steps, 503 otherwise: what load balancers, routers and container
healthchecks poll) and GET /metrics (Prometheus text of the server's metrics)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pagoda.adapters.common.metrics import ServerMetrics
from pagoda.backend.engine_client import EngineClient


def probe_routes(client: EngineClient, metrics: ServerMetrics) -> list[Route]:
    async def health(request: Request) -> Response:
        return Response(status_code=200 if client.is_running else 503)

    async def render_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", render_metrics, methods=["GET"]),
    ]
