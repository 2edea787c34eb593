"""Run the API under uvicorn: load the engine, start its thread, serve, stop it on the way out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import uvicorn
from starlette.routing import BaseRoute

from pagoda.adapters.openai.app import create_app
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig
from pagoda.backend.engine import LLMEngine

logger = logging.getLogger(__name__)

# Routes another adapter serves from the same app, built once the engine exists.
ExtraRoutes = Callable[[AsyncEngine], Sequence[BaseRoute]]


def run_server(
    engine_config: EngineConfig, settings: ServerSettings, extra_routes: ExtraRoutes | None = None
) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM)."""
    engine = AsyncEngine(LLMEngine(engine_config))
    engine.start()
    try:
        routes = extra_routes(engine) if extra_routes is not None else ()
        app = create_app(engine, settings, routes)
        logger.info(
            "serving %s on http://%s:%d/v1", settings.model_name, settings.host, settings.port
        )
        uvicorn.run(
            app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
            # The engine is the bottleneck; a slow client must not hold the shutdown forever.
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()
