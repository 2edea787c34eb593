"""POST /v1/embeddings: each input's pooled final hidden states (the engine's pooling request,
prefill only, batched with everything else), as floats or base64 float32, OpenAI's shapes."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.adapters.common.disconnect import ClientDisconnected, unless_disconnected
from pagoda.adapters.common.embeddings import base64_float32, embed_prompts
from pagoda.adapters.openai.errors import OpenAIError, engine_error, invalid_param
from pagoda.adapters.openai.parsing import parse_body, read_json
from pagoda.adapters.openai.protocol import PromptInput, RequestModel
from pagoda.adapters.openai.serving import CLIENT_CLOSED_REQUEST
from pagoda.adapters.openai.serving_completions import prompt_list
from pagoda.adapters.openai.state import ServerState
from pagoda.backend.engine_client import Prompt
from pagoda.backend.errors import EngineError
from pagoda.backend.outputs import RequestOutput

# Engine field names -> this request's, for the param of an engine error.
_PARAM_NAMES = {"prompt": "input"}


class EmbeddingRequest(RequestModel):
    input: PromptInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # floats, or base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class EmbeddingsEndpoint:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, request: Request) -> Response:
        tracker = self.state.metrics.track()
        try:
            body = parse_body(
                EmbeddingRequest, await read_json(request, self.state.settings.max_request_bytes)
            )
            model = self.state.resolve_model(body.model)
            if body.dimensions is not None:
                raise invalid_param(
                    "dimensions is not supported: embeddings have the model's hidden size",
                    "dimensions",
                )
            prompts = prompt_list(body.input, "input")
            with self.state.admit(len(prompts)):
                outputs = await unless_disconnected(request, self._embed(prompts))
        except OpenAIError as error:
            tracker.finish("error" if error.status_code == 500 else "rejected")
            raise
        except ClientDisconnected:
            tracker.finish("aborted")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        for index, output in enumerate(outputs):
            tracker.observe(index, output)
        tracker.finish("success")
        num_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        response = EmbeddingResponse(
            data=[
                EmbeddingData(index=index, embedding=_encoded(output, body.encoding_format))
                for index, output in enumerate(outputs)
            ],
            model=model,
            usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
        )
        return JSONResponse(response.model_dump(mode="json"))

    async def _embed(self, prompts: list[Prompt]) -> list[RequestOutput]:
        try:
            return await embed_prompts(self.state.client, f"embd-{uuid.uuid4().hex}", prompts)
        except EngineError as error:
            raise engine_error(error, _PARAM_NAMES) from None


def _encoded(output: RequestOutput, encoding_format: str | None) -> list[float] | str:
    assert output.embedding is not None
    return base64_float32(output.embedding) if encoding_format == "base64" else output.embedding
