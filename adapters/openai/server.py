"""Run the API under uvicorn: load the engine, start its thread, serve, stop it on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import uvicorn
from starlette.responses import Response
from starlette.routing import BaseRoute

from pagoda.adapters.draining import Drain, DrainingServer, DrainMiddleware
from pagoda.adapters.openai.app import create_app
from pagoda.adapters.openai.errors import RETRY_AFTER_SECONDS, SERVER_ERROR, OpenAIError
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig
from pagoda.backend.engine import LLMEngine

logger = logging.getLogger(__name__)

# Routes another adapter serves from the same app, built once the engine exists.
ExtraRoutes = Callable[[AsyncEngine], Sequence[BaseRoute]]
# Work another adapter runs next to the server (FastChat's controller registration), given the
# server to see when it listens; cancelled when the server stops.
Alongside = Callable[[uvicorn.Server], Awaitable[None]]


def run_server(
    engine_config: EngineConfig, settings: ServerSettings, extra_routes: ExtraRoutes | None = None,
    alongside: Alongside | None = None,
) -> None:
    """Serve until interrupted: Ctrl-C stops at once, SIGTERM after draining (adapters/draining)."""
    engine = AsyncEngine(LLMEngine(engine_config))
    engine.start()
    try:
        routes = extra_routes(engine) if extra_routes is not None else ()
        drain = Drain()
        app = DrainMiddleware(create_app(engine, settings, routes), drain, _shutting_down)
        logger.info(
            "serving %s on http://%s:%d/v1", settings.model_name, settings.host, settings.port
        )
        server = DrainingServer(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
        ), drain, settings.shutdown_timeout)
        # uvicorn re-raises the SIGINT it stopped on, once it has shut down: Ctrl-C is the
        # normal way to stop (uvicorn.run swallows it the same way).
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(server, alongside))
    finally:
        engine.shutdown()


def _shutting_down() -> Response:
    return OpenAIError(
        503, "the server is shutting down; retry on another replica or later", type=SERVER_ERROR,
        code="server_shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    ).to_response()


async def _serve(server: uvicorn.Server, alongside: Alongside | None) -> None:
    task = asyncio.create_task(alongside(server)) if alongside is not None else None
    try:
        await server.serve()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
