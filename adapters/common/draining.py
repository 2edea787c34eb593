"""Serving under uvicorn with graceful shutdown on SIGTERM, shared by `pagoda serve` and
`pagoda worker`.

On SIGTERM the server drains: new requests get 503 (and /health reports draining, so a load
balancer stops sending), requests in flight run to their end for up to `shutdown_timeout`
seconds; requests still running then are failed by `cut_requests` (their streams end with an
error event saying the server shut down, rather than just stopping), then uvicorn stops and the
process exits 0. A second SIGTERM, or SIGINT (Ctrl-C), stops
at once, as uvicorn does by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

# Work an adapter runs next to its server (FastChat's controller registration), given the server
# to see when it listens; cancelled when the server stops.
Alongside = Callable[[uvicorn.Server], Awaitable[None]]
# Once drained (or out of time), how long uvicorn gives the connections left to close.
_CLOSE_CONNECTIONS_SECONDS = 1


class Drain:
    """Counts the HTTP requests in flight and says whether the server is draining."""

    def __init__(self) -> None:
        self.draining = False
        self.num_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.num_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if not self.num_in_flight:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class DrainMiddleware:
    """Wraps the whole app: counts requests, and while draining answers every new one with
    `refusal()` (a 503) and /health with 503 `{"status": "draining"}`."""

    def __init__(self, app: ASGIApp, drain: Drain, refusal: Callable[[], Response]) -> None:
        self.app = app
        self.drain = drain
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            if scope.get("path") == "/health":
                response: Response = JSONResponse({"status": "draining"}, 503)
            else:
                response = self.refusal()
            await response(scope, receive, send)
            return
        with self.drain.track():
            await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains on the first SIGTERM instead of stopping at once."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, shutdown_timeout: float,
        cut_requests: Callable[[], None],
    ) -> None:
        config.timeout_graceful_shutdown = _CLOSE_CONNECTIONS_SECONDS
        super().__init__(config)
        self.drain = drain
        self.shutdown_timeout = shutdown_timeout
        self.cut_requests = cut_requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.drain.draining and self._loop is not None:
            # NOTE: not recorded as a captured signal, so uvicorn does not re-raise SIGTERM once
            # it has stopped: a drained server exits 0.
            self.drain.draining = True
            self._loop.call_soon_threadsafe(self._start_draining)
            return
        super().handle_exit(sig, frame)

    def _start_draining(self) -> None:
        self._drainer = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        started = time.monotonic()
        logger.info("SIGTERM: refusing new requests; waiting up to %.0f s for %d in flight",
                    self.shutdown_timeout, self.drain.num_in_flight)
        if await self.drain.wait_idle(self.shutdown_timeout):
            logger.info("drained in %.1f s; stopping", time.monotonic() - started)
        else:
            logger.warning("%d requests still in flight after %.0f s; stopping anyway",
                           self.drain.num_in_flight, self.shutdown_timeout)
            # Off the event loop: it waits for the engine's step to end, while the loop goes on
            # sending the failed requests' last events.
            await asyncio.to_thread(self.cut_requests)
        self.should_exit = True


def serve_draining(
    app: ASGIApp, *, host: str, port: int, shutdown_timeout: float,
    refusal: Callable[[], Response], cut_requests: Callable[[], None],
    alongside: Alongside | None = None, **uvicorn_options: Any,
) -> None:
    """Serve `app` on host:port until stopped: Ctrl-C stops at once; SIGTERM drains first, new
    requests getting `refusal()` meanwhile, and `cut_requests()` fails those still running when
    the time is up. `uvicorn_options` go to uvicorn.Config."""
    drain = Drain()
    config = uvicorn.Config(
        DrainMiddleware(app, drain, refusal), host=host, port=port, **uvicorn_options
    )
    server = DrainingServer(config, drain, shutdown_timeout, cut_requests)
    # uvicorn re-raises the SIGINT it stopped on, once it has shut down: Ctrl-C is the normal way
    # to stop (uvicorn.run swallows it the same way).
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(server, alongside))


async def _serve(server: uvicorn.Server, alongside: Alongside | None) -> None:
    task = asyncio.create_task(alongside(server)) if alongside is not None else None
    try:
        await server.serve()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
