"""FastChat's model-worker protocol: request fields, error codes and the chunks sent back.

Mirrors fastchat 0.2.36 (fastchat/constants.py and fastchat/serve/*_worker.py) without importing
it. Every answer is a JSON object with `text` and `error_code` (0 when all went well); errors are
sent with HTTP 200 in that same shape, because FastChat's API server reads the code from the body
and turns any other status into a bare 50001.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pagoda.backend.errors import EngineError, InvalidParameter, PromptTooLong
from pagoda.backend.generation_defaults import NO_SAMPLING_DEFAULTS, SamplingDefaults
from pagoda.backend.sampling_params import SamplingParams

# FastChat's default when a request names no max_new_tokens (fastchat/serve/inference.py).
DEFAULT_MAX_NEW_TOKENS = 256
CHUNK_DELIMITER = b"\0"

BodyT = TypeVar("BodyT", bound=BaseModel)


class ErrorCode(IntEnum):
    """The subset of fastchat.constants.ErrorCode a worker sends, with FastChat's values."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001


class WorkerError(Exception):
    """A request the worker answers with a FastChat error chunk instead of generated text."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    def chunk(self) -> dict[str, Any]:
        return error_chunk(self.code, str(self))


class GenerateRequest(BaseModel):
    """The body of /worker_generate_stream and /worker_generate. FastChat's peers send None for
    fields their caller left unset, so None always means "FastChat's default"; fields FastChat
    sends that Pagoda has no use for (images, request_id, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    echo: bool | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    best_of: int | None = None
    use_beam_search: bool | None = None

    @classmethod
    def parse(cls, body: Any) -> GenerateRequest:
        return _parse(cls, body)

    @property
    def wants_echo(self) -> bool:
        # NOTE: FastChat's workers echo the prompt unless told not to; its peers all send
        # "echo": false for chat, and completions pass the client's echo through.
        return True if self.echo is None else self.echo

    def sampling_params(self, defaults: SamplingDefaults = NO_SAMPLING_DEFAULTS) -> SamplingParams:
        """The engine's parameters for this request; WorkerError 40302 for a value out of range.
        `defaults` (the model's generation_config.json) fill the fields the request leaves
        unset and cap max_new_tokens, as on the OpenAI side (FastChat's peers send most)."""
        given = defaults.fill({"temperature": self.temperature, "top_p": self.top_p,
                               "top_k": self.top_k,
                               "repetition_penalty": self.repetition_penalty})
        temperature = _or(given["temperature"], 1.0)
        top_p = _or(given["top_p"], 1.0)
        if top_p == 0.0:
            # FastChat's UIs allow top_p 0, which keeps only the most likely token: greedy.
            top_p, temperature = 1.0, 0.0
        use_beam_search = bool(self.use_beam_search)
        if use_beam_search:
            # FastChat's peers always send a temperature (its API server defaults to 0.7);
            # beam search is deterministic and does not use it.
            temperature = 0.0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            # The engine takes 0 (prompt only), which a FastChat worker has no use for.
            message = f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
            raise WorkerError(ErrorCode.PARAM_OUT_OF_RANGE, message)
        try:
            return SamplingParams(
                n=1,
                best_of=self.best_of,
                use_beam_search=use_beam_search,
                temperature=temperature,
                top_p=top_p,
                top_k=_or(given["top_k"], -1),
                min_p=_or(given.get("min_p"), 0.0),
                repetition_penalty=_or(given["repetition_penalty"], 1.0),
                presence_penalty=_or(self.presence_penalty, 0.0),
                frequency_penalty=_or(self.frequency_penalty, 0.0),
                # FastChat sends "" for "no stop string" (conv.stop_str of many templates).
                stop=[s for s in stop if s],
                stop_token_ids=list(self.stop_token_ids or []),
                max_tokens=defaults.cap_max_tokens(self.max_new_tokens),
                logprobs=self.logprobs,
            )
        except InvalidParameter as error:
            raise engine_error(error) from None


class EmbeddingsRequest(BaseModel):
    """The body of /worker_get_embeddings: FastChat's API server sends batches of texts (token
    ids it has already decoded with tiktoken)."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None
    encoding_format: str | None = None

    @classmethod
    def parse(cls, body: Any) -> EmbeddingsRequest:
        return _parse(cls, body)

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def engine_error(error: EngineError) -> WorkerError:
    """The FastChat error for a request the engine refused or failed."""
    if error.internal:
        return WorkerError(ErrorCode.INTERNAL_ERROR, str(error))
    if isinstance(error, PromptTooLong):
        return WorkerError(ErrorCode.CONTEXT_OVERFLOW, str(error))
    return WorkerError(ErrorCode.PARAM_OUT_OF_RANGE, str(error))


def error_chunk(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"text": message, "error_code": int(code)}


def encode_chunk(chunk: dict[str, Any]) -> bytes:
    """One streamed chunk: JSON followed by a NUL byte, the delimiter FastChat's peers split on."""
    return json.dumps(chunk).encode() + CHUNK_DELIMITER


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _parse(model: type[BodyT], body: Any) -> BodyT:
    """The body as `model`; WorkerError 40001 naming what is wrong with it."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise WorkerError(ErrorCode.VALIDATION_TYPE_ERROR, _describe(error)) from None


def _describe(error: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
        for item in error.errors()
    ]
    return "invalid request: " + "; ".join(problems)
