"""POST /tokenize and /detokenize, with vLLM's request and response shapes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.parsing import parse_body, read_json
from pagoda.adapters.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.adapters.openai.state import ServerState


class TokenEndpoints:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def tokenize(self, request: Request) -> JSONResponse:
        body = parse_body(
            TokenizeRequest, await read_json(request, self.state.settings.max_request_bytes)
        )
        self.state.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid_param("give exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
            text = self.state.render_chat(
                body.messages, body.add_generation_prompt, body.chat_template_kwargs,
                tools or None,
            )
        else:
            text = body.prompt or ""
        # By default (None) as the engine encodes a prompt: the count is the one a request uses.
        tokens = self.state.client.encode(text, add_special_tokens=body.add_special_tokens)
        strings = None
        if body.return_token_strs:
            strings = [self.state.token_strings.text(token_id) for token_id in tokens]
        return JSONResponse(TokenizeResponse(
            count=len(tokens), max_model_len=self.state.max_model_len, tokens=tokens,
            token_strs=strings,
        ).model_dump())

    async def detokenize(self, request: Request) -> JSONResponse:
        body = parse_body(
            DetokenizeRequest, await read_json(request, self.state.settings.max_request_bytes)
        )
        self.state.resolve_model(body.model)
        vocab_size = len(self.state.client.info.tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid_param(
                f"tokens: token id {bad} is outside the vocabulary (size {vocab_size})", "tokens"
            )
        text = self.state.client.decode(body.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
