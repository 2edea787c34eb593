"""Request bodies as JSON, read with a byte limit; each adapter answers the failure its own way."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request


class RequestBodyError(Exception):
    """A body that is not one JSON value, or (`too_large`) one over the byte limit."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The body as JSON, refused past max_bytes: up front when Content-Length says so, else as
    soon as a chunked body grows past it (so an endless body is never buffered)."""
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
        raise RequestBodyError(f"the request body is not valid JSON: {error}") from None
    except RecursionError:  # e.g. [[[[...]]]] nested deeper than the parser's recursion limit
        raise RequestBodyError("the request body is nested too deeply") from None


def _too_large(max_bytes: int) -> RequestBodyError:
    return RequestBodyError(
        f"the request body exceeds the limit of {max_bytes} bytes", too_large=True
    )
