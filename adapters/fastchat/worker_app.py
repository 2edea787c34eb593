"""FastChat's worker endpoints as Starlette routes, all POST as FastChat's peers call them.

Answers always come with HTTP 200 and FastChat's `error_code` in the body: its API server and
controller read errors from there and reduce any other status to a code-less failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pagoda.adapters.common.body import RequestBodyError, read_json_body
from pagoda.adapters.common.disconnect import ClientDisconnected, unless_disconnected
from pagoda.adapters.common.listener import DEFAULT_MAX_REQUEST_BYTES
from pagoda.adapters.fastchat.protocol import ErrorCode, WorkerError, encode_chunk
from pagoda.adapters.fastchat.worker import FastChatWorker


class NulDelimitedStream(StreamingResponse):
    """FastChat's stream: JSON chunks each followed by a NUL byte."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]]) -> None:
        super().__init__(_encoded(chunks))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Starlette stops iterating when the client disconnects but leaves the generator
            # suspended; closing it now aborts the engine request and frees its concurrency slot
            # at once instead of whenever the generator is garbage-collected.
            await self.body_iterator.aclose()


def worker_routes(
    worker: FastChatWorker, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> list[Route]:
    async def _json_body(request: Request) -> Any:
        return await _read_json_body(request, max_request_bytes)

    async def generate_stream(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except WorkerError as error:
            return NulDelimitedStream(_single(error.chunk()))
        return NulDelimitedStream(worker.generate_stream(body))

    async def answer(
        request: Request, work: Callable[[Any], Awaitable[dict[str, Any]]]
    ) -> Response:
        """`work(body)` as one JSON answer; a client that leaves first aborts its engine work."""
        try:
            body = await _json_body(request)
        except WorkerError as error:
            return JSONResponse(error.chunk())
        try:
            return JSONResponse(await unless_disconnected(request, work(body)))
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it

    async def generate(request: Request) -> Response:
        return await answer(request, worker.generate)

    async def get_status(request: Request) -> Response:
        return JSONResponse(worker.status())

    async def count_token(request: Request) -> Response:
        try:
            body = await _json_body(request)
            prompt = body.get("prompt") if isinstance(body, dict) else None
            if not isinstance(prompt, str):
                raise WorkerError(ErrorCode.VALIDATION_TYPE_ERROR, "prompt must be a string")
        except WorkerError as error:
            return JSONResponse(error.chunk())
        return JSONResponse({"count": worker.count_tokens(prompt), "error_code": 0})

    async def model_details(request: Request) -> Response:
        return JSONResponse({"context_length": worker.context_length})

    async def get_conv_template(request: Request) -> Response:
        return JSONResponse({"conv": worker.conv_template})

    async def get_embeddings(request: Request) -> Response:
        return await answer(request, worker.get_embeddings)

    endpoints = {
        "/worker_generate_stream": generate_stream,
        "/worker_generate": generate,
        "/worker_get_status": get_status,
        "/count_token": count_token,
        "/model_details": model_details,
        "/worker_get_conv_template": get_conv_template,
        "/worker_get_embeddings": get_embeddings,
    }
    return [Route(path, endpoint, methods=["POST"]) for path, endpoint in endpoints.items()]


async def _read_json_body(request: Request, max_bytes: int) -> Any:
    """The body as JSON; error 40001 for one that is not, or that is over max_bytes."""
    try:
        return await read_json_body(request, max_bytes)
    except RequestBodyError as error:
        raise WorkerError(ErrorCode.VALIDATION_TYPE_ERROR, str(error)) from None


async def _encoded(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            yield encode_chunk(chunk)


async def _single(chunk: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield chunk
