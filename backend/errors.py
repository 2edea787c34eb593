"""What the engine reports about a request it refuses or fails: typed errors carrying the field
and the numbers, so adapters map types to their protocol's errors instead of parsing messages.

    EngineError
    ├── RequestRejected (also a ValueError)   the request's fault
    │   ├── InvalidParameter                  a sampling or request field out of range
    │   ├── PromptTooLong                     the prompt leaves no room under max_model_len
    │   └── KVCacheCapacityExceeded           more KV blocks than the whole cache, even alone
    └── RequestFailed (also a RuntimeError)   the server's fault (`internal`)

A RequestRejected is raised when a request is submitted; a request that fails once accepted (it
outgrew the KV cache, or the model raised on it) ends with the error in `RequestOutput.error`.
"""

from __future__ import annotations

from typing import ClassVar


class EngineError(Exception):
    """Why the engine refused or failed one request; `str()` is a message for its user."""

    # The server's fault (the model or the engine failed), as opposed to the request's.
    internal: ClassVar[bool] = False

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The request field at fault, by the engine's names (SamplingParams fields, "prompt",
        # "request_id"); None when no one field is.
        self.field = field


class RequestRejected(EngineError, ValueError):
    """The request cannot be served as sent. A ValueError, so callers of `LLM.generate` that
    catch ValueError keep working."""


class InvalidParameter(RequestRejected):
    """A field out of range: `field` names it ("temperature", "n", "stop_token_ids", ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field)


class PromptTooLong(RequestRejected):
    """The prompt has no room left under max_model_len for even one generated token."""

    def __init__(self, prompt_len: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt has {prompt_len} tokens; max_model_len is {max_model_len}, which must also "
            "leave room for at least one generated token",
            "prompt",
        )
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


class KVCacheCapacityExceeded(RequestRejected):
    """The request needs more KV blocks than the whole cache holds, so it could never run, even
    alone. `max_request_tokens` is the limit in the user's terms: the largest prompt + max_tokens
    x n that fits for this prompt and n (None when not even one token per sample fits)."""

    def __init__(
        self, num_blocks_needed: int, num_blocks_total: int, block_size: int,
        max_request_tokens: int | None,
    ) -> None:
        if max_request_tokens is None:
            advice = "not even one generated token per sample fits: lower n or shorten the prompt"
        else:
            advice = (f"prompt + max_tokens x n can be at most {max_request_tokens} tokens for "
                      "this prompt and n: lower max_tokens or n")
        super().__init__(
            f"request needs {num_blocks_needed} KV blocks but the whole cache has "
            f"{num_blocks_total} (of {block_size} tokens); {advice}, or raise num_kv_blocks"
        )
        self.num_blocks_needed = num_blocks_needed
        self.num_blocks_total = num_blocks_total
        self.block_size = block_size
        self.max_request_tokens = max_request_tokens


class RequestFailed(EngineError, RuntimeError):
    """The engine could not finish the request for a reason of its own: the model raised on it,
    the engine loop failed, or the engine is shut down. A RuntimeError, as those were before."""

    internal = True
