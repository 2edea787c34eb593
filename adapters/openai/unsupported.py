"""Request fields Pagoda does not implement and that would change the answer: refused with a 400
naming the field. Ignoring them would be worse than an error: a client that asked for JSON or a
tool call would take free text for what it asked.

NOTE: an endpoint whose request model declares a field serves it (chat serves tools and
tool_choice; chat and completions serve response_format and vLLM's structured-outputs extras),
so only the endpoints that do not are refused it.

Fields that do not change the answer (user, metadata, store, service_tier, parallel_tool_calls,
prediction, ...) are not listed: they are accepted and ignored like any other unknown field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from pagoda.adapters.openai.errors import OpenAIError

Refuses = Callable[[Any], bool]


def _given(value: Any) -> bool:
    """Sent with some content: null, false and empty values ask for nothing."""
    return value not in (None, False, "", [], {})


def _beyond(*harmless: Any) -> Refuses:
    """Refuses any value given but `harmless` ones (those that ask for the default)."""
    return lambda value: _given(value) and value not in harmless


TOOLS = "tool calling is served by /v1/chat/completions and /v1/responses only"

# field -> (whether a value is refused, why). NOTE: a field the request model declares is one
# that endpoint implements, so it is not refused there.
REFUSED_FIELDS: dict[str, tuple[Refuses, str]] = {
    "tools": (_given, TOOLS),
    "tool_choice": (_beyond("none", "auto"), TOOLS),
    "functions": (_given, TOOLS),
    "function_call": (_beyond("none", "auto"), TOOLS),
    "suffix": (_given, "completions with a suffix (insertion) are not supported"),
    "modalities": (_beyond(["text"]), "only text output is served"),
    "audio": (_given, "audio output is not supported"),
    "web_search_options": (_given, "web search is not supported"),
    "chat_template": (_given, "a per-request chat template is not supported; start the server "
                              "with --chat-template"),
    "continue_final_message": (_given, "continuing the final message is not supported"),
    "documents": (_given, "documents for the chat template are not supported"),
    "bad_words": (_given, "bad_words is not supported"),
    "allowed_token_ids": (_given, "allowed_token_ids is not supported"),
    "logits_processors": (_given, "logits processors are not supported"),
    "truncate_prompt_tokens": (_given, "prompt truncation is not supported"),
    "return_tokens_as_token_ids": (_given, "return_tokens_as_token_ids is not supported"),
}


def check_supported(model: type[BaseModel], body: dict[str, Any]) -> None:
    """Raise a 400 naming the first field of `body` that asks `model`'s endpoint for what
    Pagoda does not do."""
    for field, (refuses, why) in REFUSED_FIELDS.items():
        if field in body and field not in model.model_fields and refuses(body[field]):
            raise OpenAIError(
                400, f"{field}: {why}; Pagoda refuses it rather than ignore it and answer "
                     "differently than asked",
                param=field, code="unsupported_parameter",
            )
