"""Request bodies in: size limit, JSON, then a pydantic model; each failure a named 400 (or 413)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from pagoda.adapters.openai.errors import OpenAIError, invalid_param

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON, refused with 413 past max_bytes: up front when Content-Length says so,
    else as soon as a chunked body grows past it (so an endless body is never buffered)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid_param(f"the request body is not valid JSON: {error}", None) from None
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than the parser's recursion limit
        raise invalid_param("the request body is nested too deeply", None) from None


def parse_body(model: type[ModelT], body: Any) -> ModelT:
    if not isinstance(body, dict):
        raise invalid_param("the request body must be a JSON object", None)
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = _param_path(first["loc"])
        raise invalid_param(f"{param}: {first['msg']}", param) from None


def _param_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as the param OpenAI names, e.g. messages[0].content. Union members
    (tagged like `list[int]`) are pydantic's bookkeeping, not fields, so they are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool"):
            path += f".{part}" if path else part
    return path


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(
        413, f"the request body exceeds the limit of {max_bytes} bytes", code="request_too_large"
    )
