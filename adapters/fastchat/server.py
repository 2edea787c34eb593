"""`pagoda worker`: one engine served as a FastChat model worker (its flags: flags.py); and
`pagoda serve --fastchat-controller`: the same worker on the OpenAI server's app and engine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pagoda.adapters.common.draining import serve_draining
from pagoda.adapters.common.metrics import ServerMetrics
from pagoda.adapters.common.probes import probe_routes
from pagoda.adapters.common.startup import start_engine
from pagoda.adapters.fastchat.conv_template import resolve_conv_template
from pagoda.adapters.fastchat.protocol import ErrorCode, WorkerError
from pagoda.adapters.fastchat.registration import (
    ControllerRegistration,
    check_http_url,
    heart_beat_interval_from_env,
)
from pagoda.adapters.fastchat.worker import FastChatWorker
from pagoda.adapters.fastchat.worker_app import worker_routes
from pagoda.backend.config import EngineConfig
from pagoda.backend.demo import DEMO_MODEL_NAME
from pagoda.backend.engine_client import EngineClient

STARTED_POLL_SECONDS = 0.05
# Idle keep-alive connections are closed after this long. It must outlast the clients' own idle
# expiry (httpx: 5 s, aiohttp: 15 s): at uvicorn's default of 5 s the server and an httpx client
# give up on an idle connection at the same moment, and a request sent on it just then fails
# with a connection reset (httpx.ReadError) instead of being answered.
KEEP_ALIVE_SECONDS = 75


def default_model_name(model: str | None) -> str:
    """FastChat's rule: the last part of the model path; the demo model has its own name."""
    return DEMO_MODEL_NAME if model is None else model.rstrip("/").split("/")[-1]


def default_worker_address(host: str, port: int) -> str:
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"  # a wildcard bind address is no address to call back
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def expand_worker_address(address: str) -> str:
    """Fills in `{hostname}`: scaled container replicas share one command line but each must
    register the address the controller reaches it at (its container host name)."""
    return address.replace("{hostname}", socket.gethostname())


def run_worker(args: argparse.Namespace, config: EngineConfig) -> int:
    """Serve until interrupted. Flag errors raise ValueError before the model is loaded, a model
    that cannot load raises StartupError."""
    # Before the template lookup: importing fastchat fails on a bad heartbeat variable.
    heart_beat_interval = heart_beat_interval_from_env()
    worker_address = check_http_url(
        "--worker-address",
        expand_worker_address(args.worker_address or default_worker_address(args.host, args.port)),
    )
    controller_address = check_http_url("--controller-address", args.controller_address)
    model_names = args.model_names or [default_model_name(config.model)]
    conv_template = resolve_conv_template(args.conv_template, config.model, model_names)

    with start_engine(config) as client:
        metrics = ServerMetrics(client)
        worker = FastChatWorker(client, model_names, conv_template, args.limit_worker_concurrency,
                                args.max_waiting_requests, metrics)
        keep_registered = None
        if not args.no_register:
            registration = ControllerRegistration(
                controller_address, worker_address, worker.status, heart_beat_interval
            )
            keep_registered = functools.partial(_register_once_started, registration=registration)
        serve_draining(
            # FastChat's routes, and /health and /metrics for load balancers and scrapers.
            Starlette(routes=[*probe_routes(client, metrics),
                              *worker_routes(worker, args.max_request_bytes)]), host=args.host,
            port=args.port, shutdown_timeout=args.shutdown_timeout, refusal=_shutting_down,
            cut_requests=client.shutdown, alongside=keep_registered, log_level="info", timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    return 0


@dataclass
class AttachedWorker:
    """The FastChat worker of `pagoda serve --fastchat-controller`: `routes` go on the OpenAI
    server's app (outside /v1, so no API key: FastChat's peers send none) and `keep_registered`
    runs next to that server."""

    controller_address: str
    worker_address: str
    model_names: list[str]
    conv_template: dict[str, Any]
    max_waiting_requests: int | None
    heart_beat_interval: float
    worker: FastChatWorker | None = None

    def routes(self, client: EngineClient, metrics: ServerMetrics) -> list[Route]:
        """FastChat's routes; the OpenAI app already answers /health and /metrics."""
        self.worker = FastChatWorker(client, self.model_names, self.conv_template,
                                     max_waiting_requests=self.max_waiting_requests,
                                     metrics=metrics)
        return worker_routes(self.worker)

    async def keep_registered(self, server: uvicorn.Server) -> None:
        assert self.worker is not None, "routes() builds the worker before the server runs"
        registration = ControllerRegistration(
            self.controller_address, self.worker_address, self.worker.status,
            self.heart_beat_interval,
        )
        await _register_once_started(server, registration)


def attached_worker_from_args(
    args: argparse.Namespace, config: EngineConfig, host: str, port: int,
    model_names: list[str], max_waiting_requests: int | None,
) -> AttachedWorker | None:
    """The worker `pagoda serve`'s flags ask for, or None; ValueError naming a bad flag."""
    if args.fastchat_controller is None:
        if args.fastchat_worker_address or args.fastchat_conv_template:
            raise ValueError("--fastchat-worker-address and --fastchat-conv-template need "
                             "--fastchat-controller")
        return None
    heart_beat_interval = heart_beat_interval_from_env()
    controller_address = check_http_url("--fastchat-controller", args.fastchat_controller)
    worker_address = check_http_url(
        "--fastchat-worker-address",
        expand_worker_address(args.fastchat_worker_address or default_worker_address(host, port)),
    )
    conv_template = resolve_conv_template(args.fastchat_conv_template, config.model, model_names)
    return AttachedWorker(controller_address, worker_address, model_names, conv_template,
                          max_waiting_requests, heart_beat_interval)


async def _register_once_started(
    server: uvicorn.Server, registration: ControllerRegistration
) -> None:
    """Keep the worker registered from the moment `server` accepts connections (the controller
    may call back at once) until cancelled."""
    while not server.started:
        await asyncio.sleep(STARTED_POLL_SECONDS)
    await registration.run()


def _shutting_down() -> Response:
    # HTTP 503 for load balancers, FastChat's body for its peers (which read error_code).
    error = WorkerError(ErrorCode.ENGINE_OVERLOADED, "this worker is shutting down; retry later")
    return JSONResponse(error.chunk(), 503)

