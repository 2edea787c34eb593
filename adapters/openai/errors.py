"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise OpenAIError; the app turns it (and Starlette's own HTTP errors, and anything
unexpected) into that envelope, so every client library reads every failure the same way.
"""

from __future__ import annotations

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.adapters.openai.protocol import ErrorInfo, ErrorResponse

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


def param_of(message: str, known: set[str]) -> str | None:
    """The field a validation message is about: the backend's messages start with its name."""
    match = re.match(r"[a-z_]+", message)
    return match.group() if match and match.group() in known else None


def engine_rejection(error: ValueError, prompt_param: str) -> OpenAIError:
    """A request the engine refused to queue; the over-long prompt gets OpenAI's own code."""
    message = str(error)
    if "max_model_len" in message:
        return OpenAIError(400, message, param=prompt_param, code="context_length_exceeded")
    known = {"prompt", "n", "stop_token_ids", "logit_bias"}
    return invalid_param(message, param_of(message, known))


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
