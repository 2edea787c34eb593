"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise OpenAIError; the app turns it (and Starlette's own HTTP errors, and anything
unexpected) into that envelope, so every client library reads every failure the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.adapters.openai.protocol import ErrorInfo, ErrorResponse
from pagoda.backend.errors import EngineError, KVCacheCapacityExceeded, PromptTooLong

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# Seconds an overloaded server asks a client to wait before retrying.
RETRY_AFTER_SECONDS = 1


class OpenAIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers

    def to_response(self) -> JSONResponse:
        return JSONResponse(
            ErrorResponse(error=self.info).model_dump(), self.status_code, headers=self.headers
        )


def invalid_param(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def engine_error(error: EngineError, param_names: Mapping[str, str]) -> OpenAIError:
    """The answer to a request the engine refused or failed. `param_names` maps the engine's
    field names to this request's (chat's prompt is its `messages`, say)."""
    if error.internal:
        return engine_failure(str(error))
    param = None if error.field is None else param_names.get(error.field, error.field)
    if isinstance(error, PromptTooLong):
        return OpenAIError(400, str(error), param=param, code="context_length_exceeded")
    if isinstance(error, KVCacheCapacityExceeded):
        # Its size (prompt, n, best_of, max_tokens) is the problem, not the server's load.
        return OpenAIError(400, str(error), code="kv_cache_capacity_exceeded")
    return invalid_param(str(error), param)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
    )


def overloaded(num_waiting: int) -> OpenAIError:
    return OpenAIError(
        503,
        f"the server is overloaded ({num_waiting} requests are waiting); retry later",
        type=SERVER_ERROR,
        code="server_overloaded",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def engine_failure(message: str) -> OpenAIError:
    return OpenAIError(500, message, type=SERVER_ERROR, code="engine_error")


async def handle_openai_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, OpenAIError)
    return error.to_response()


async def handle_http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own errors (unknown route, wrong method) in the same envelope."""
    assert isinstance(error, HTTPException)
    return OpenAIError(error.status_code, error.detail, headers=error.headers).to_response()


async def handle_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # NOTE: Starlette re-raises the error after this response, so the server logs its traceback.
    return OpenAIError(
        500, f"internal server error: {type(error).__name__}", type=SERVER_ERROR
    ).to_response()
