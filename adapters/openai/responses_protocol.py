"""The Responses API's bodies: the request (a string, or input items: messages of text parts and
an agent's earlier function calls and their outputs) and the response object and stream events
as the openai SDK parses them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.protocol import SamplingRequest

INPUT_ROLES = ("system", "developer", "user", "assistant")
# Text parts of a message: what a user writes, and an earlier reply sent back as input.
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(SamplingRequest):
    """OpenAI's fields; vLLM's sampling extras (top_k, ...) are taken as for chat."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None


def input_messages(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as chat messages with string content: function_call items become an
    assistant message's tool_calls, function_call_output items tool messages. Anything else
    (images, files, other tools' items) is a 400 naming where it is."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "function_call":
            _add_call(messages, item, param)
            continue
        if kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", param),
                             "content": _text(item.get("output"), f"{param}.output")})
            continue
        if kind != "message":
            raise invalid_param(
                f"{param}.type {kind!r} is not supported: input items are messages, "
                "function_call and function_call_output", f"{param}.type"
            )
        role = item.get("role")
        if role not in INPUT_ROLES:
            raise invalid_param(
                f"{param}.role must be one of {', '.join(INPUT_ROLES)}, got {role!r}",
                f"{param}.role",
            )
        messages.append({"role": role, "content": _text(item.get("content"), param)})
    return messages


def _add_call(messages: list[dict[str, Any]], item: dict[str, Any], param: str) -> None:
    """A call joins the assistant message before it, as chat has an answer's text and calls in
    one message (OpenAI's items split them)."""
    call = {"id": _string(item, "call_id", param), "type": "function",
            "function": {"name": _string(item, "name", param),
                         "arguments": _string(item, "arguments", param)}}
    if not messages or messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": None})
    messages[-1].setdefault("tool_calls", []).append(call)


def _string(item: dict[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_param(f"{param}.{key} must be a string", f"{param}.{key}")
    return value


def _text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid_param(f"{param}.content must be a string or a list of parts",
                            f"{param}.content")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(
            part.get("text"), str
        ):
            kind = part.get("type") if isinstance(part, dict) else None
            raise invalid_param(
                f"{param}.content[{index}]: only text parts are supported, got type {kind!r}",
                f"{param}.content[{index}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str  # the item's own id (fc_...)
    call_id: str  # what the function_call_output answering it names (call_...)
    name: str
    arguments: str  # JSON text
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(
        default_factory=lambda: {"reasoning_tokens": 0}
    )
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | FunctionCallItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool
    usage: ResponseUsage | None = None


class ResponseEvent(BaseModel):
    """One streamed event: its `type`, its place in the stream, and the type's own fields."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int
