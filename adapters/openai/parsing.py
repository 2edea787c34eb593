"""Request bodies in: size limit, JSON, fields Pagoda refuses (unsupported.py), then a pydantic
model; each failure a named 400 (or 413)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from pagoda.adapters.common.body import RequestBodyError, read_json_body
from pagoda.adapters.openai.errors import OpenAIError, invalid_param
from pagoda.adapters.openai.unsupported import check_supported

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The body as JSON: 413 past max_bytes (read no further), 400 when it is not JSON."""
    try:
        return await read_json_body(request, max_bytes)
    except RequestBodyError as error:
        if error.too_large:
            raise OpenAIError(413, str(error), code="request_too_large") from None
        raise invalid_param(str(error), None) from None


def parse_body(model: type[ModelT], body: Any) -> ModelT:
    if not isinstance(body, dict):
        raise invalid_param("the request body must be a JSON object", None)
    check_supported(model, body)
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

