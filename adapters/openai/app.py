"""The Starlette app of the OpenAI-compatible API.

`create_app` takes a started EngineClient and returns the app; it neither starts nor stops the
engine, so another adapter can serve its own routes from the same app and engine: pass them as
`extra_routes`. With an API key, every path but /health needs it (the routers' endpoints of
serving_router.py too), except `extra_routes` (the FastChat worker's: FastChat's controller and
API server send no key).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.adapters.common.metrics import ServerMetrics
from pagoda.adapters.common.probes import probe_routes
from pagoda.adapters.common.version import pagoda_version
from pagoda.adapters.openai.errors import (
    OpenAIError,
    handle_http_error,
    handle_openai_error,
    handle_unexpected_error,
)
from pagoda.adapters.openai.protocol import ModelCard, ModelList
from pagoda.adapters.openai.serving_chat import ChatEndpoint
from pagoda.adapters.openai.serving_completions import CompletionsEndpoint
from pagoda.adapters.openai.serving_embeddings import EmbeddingsEndpoint
from pagoda.adapters.openai.serving_responses import ResponsesEndpoint
from pagoda.adapters.openai.serving_router import RouterEndpoints
from pagoda.adapters.openai.serving_tokens import TokenEndpoints
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.adapters.openai.state import ServerState
from pagoda.backend.engine_client import EngineClient

# Open even with an API key: liveness probes carry no credentials.
_OPEN_PATHS = ("/health",)


def create_app(
    client: EngineClient, settings: ServerSettings, extra_routes: Sequence[BaseRoute] = (),
    metrics: ServerMetrics | None = None,
) -> Starlette:
    """`metrics`: those the extra routes record into too (by default the app's own)."""
    state = ServerState(client, settings, metrics)
    chat = ChatEndpoint(state)
    completions = CompletionsEndpoint(state)
    embeddings = EmbeddingsEndpoint(state)
    responses = ResponsesEndpoint(state)
    tokens = TokenEndpoints(state)
    router_endpoints = RouterEndpoints(state)
    model_root = client.info.model or settings.model_name

    async def server_version(request: Request) -> JSONResponse:
        return JSONResponse({"version": pagoda_version()})

    def model_card(name: str) -> ModelCard:
        return ModelCard(id=name, root=model_root, max_model_len=state.max_model_len)

    async def list_models(request: Request) -> JSONResponse:
        cards = [model_card(name) for name in settings.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def retrieve_model(request: Request) -> JSONResponse:
        name = state.resolve_model(request.path_params["model"])
        return JSONResponse(model_card(name).model_dump())

    routes: list[BaseRoute] = [
        *probe_routes(client, state.metrics),  # /health, /metrics
        Route("/version", server_version, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat.handle, methods=["POST"]),
        Route("/v1/completions", completions.handle, methods=["POST"]),
        Route("/v1/embeddings", embeddings.handle, methods=["POST"]),
        Route("/v1/responses", responses.handle, methods=["POST"]),
        Route("/v1/responses/{response_id}", responses.retrieve, methods=["GET"]),
        Route("/tokenize", tokens.tokenize, methods=["POST"]),
        Route("/detokenize", tokens.detokenize, methods=["POST"]),
        *router_endpoints.routes(),
        *extra_routes,
    ]
    middleware = []
    if settings.api_key:
        open_paths = {*_OPEN_PATHS, *(r.path for r in extra_routes if isinstance(r, Route))}
        middleware.append(
            Middleware(ApiKeyMiddleware, api_key=settings.api_key, open_paths=open_paths)
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            OpenAIError: handle_openai_error,
            HTTPException: handle_http_error,
            Exception: handle_unexpected_error,
        },
    )
    app.state.openai = state
    return app


class ApiKeyMiddleware:
    """401 for requests without `Authorization: Bearer <key>`, on every path but `open_paths`
    (unknown paths too, so a scan learns nothing without the key). /metrics and /version need
    it as well: a scraper sends it as a bearer token."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: set[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "") in self.open_paths:
            await self.app(scope, receive, send)
            return
        provided = Headers(scope=scope).get("authorization", "").encode()
        # NOTE: compare_digest takes the same time wherever the first difference is, so the
        # response time does not leak how much of a guess was right.
        if hmac.compare_digest(provided, self.expected):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided" if provided else
            "You didn't provide an API key; send it as 'Authorization: Bearer <key>'"
        )
        response = OpenAIError(401, message, code="invalid_api_key").to_response()
        await response(scope, receive, send)
