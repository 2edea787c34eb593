"""Run the API under uvicorn: load the engine, start its thread, serve, stop it on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

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
# Work another adapter runs next to the server (FastChat's controller registration), given the
# server to see when it listens; cancelled when the server stops.
Alongside = Callable[[uvicorn.Server], Awaitable[None]]


def run_server(
    engine_config: EngineConfig, settings: ServerSettings, extra_routes: ExtraRoutes | None = None,
    alongside: Alongside | None = None,
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
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level=settings.uvicorn_log_level,
            # The engine is the bottleneck; a slow client must not hold the shutdown forever.
            timeout_graceful_shutdown=5,
        ))
        # uvicorn re-raises the SIGINT it stopped on, once it has shut down: Ctrl-C is the
        # normal way to stop (uvicorn.run swallows it the same way).
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(server, alongside))
    finally:
        engine.shutdown()


async def _serve(server: uvicorn.Server, alongside: Alongside | None) -> None:
    task = asyncio.create_task(alongside(server)) if alongside is not None else None
    try:
        await server.serve()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
