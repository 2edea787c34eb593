"""Run the API under uvicorn: load the engine, start it, serve, stop it on the way out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from starlette.responses import Response
from starlette.routing import BaseRoute

from pagoda.adapters.common.draining import Alongside, serve_draining
from pagoda.adapters.common.metrics import ServerMetrics
from pagoda.adapters.common.startup import start_engine
from pagoda.adapters.openai.app import create_app
from pagoda.adapters.openai.errors import RETRY_AFTER_SECONDS, SERVER_ERROR, OpenAIError
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.backend.config import EngineConfig
from pagoda.backend.engine_client import EngineClient

logger = logging.getLogger(__name__)

# Routes another adapter serves from the same app, built once the engine exists; their requests
# count in the app's metrics.
ExtraRoutes = Callable[[EngineClient, ServerMetrics], Sequence[BaseRoute]]


def run_server(
    engine_config: EngineConfig, settings: ServerSettings, extra_routes: ExtraRoutes | None = None,
    alongside: Alongside | None = None,
) -> None:
    """Serve until interrupted: Ctrl-C stops at once, SIGTERM after draining (common/draining).
    A model that cannot load raises StartupError."""
    with start_engine(engine_config) as client:
        metrics = ServerMetrics(client)
        routes = extra_routes(client, metrics) if extra_routes is not None else ()
        logger.info(
            "serving %s on http://%s:%d/v1", settings.model_name, settings.host, settings.port
        )
        serve_draining(
            create_app(client, settings, routes, metrics), host=settings.host, port=settings.port,
            shutdown_timeout=settings.shutdown_timeout, refusal=_shutting_down,
            cut_requests=client.shutdown, alongside=alongside, log_level=settings.uvicorn_log_level,
        )


def _shutting_down() -> Response:
    return OpenAIError(
        503, "the server is shutting down; retry on another replica or later", type=SERVER_ERROR,
        code="server_shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    ).to_response()
