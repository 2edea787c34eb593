"""Function tools in the Responses API, on chat's tool calling (tools/plan.py, chat_output.py):
the flat `tools` and `tool_choice` converted to chat's, a reply's calls as function_call output
items, and those items back as the assistant message a continuation renders."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.protocol import (
    ChatTool,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
)
from pagoda.adapters.openai.responses_protocol import (
    FunctionCallItem,
    OutputMessage,
    OutputText,
    ResponsesRequest,
)
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.adapters.openai.tools.plan import ToolPlan, plan_tool_calls

OutputItem = OutputMessage | FunctionCallItem
_FUNCTION_FIELDS = ("name", "description", "parameters", "strict")


def plan_response_tools(request: ResponsesRequest, settings: ServerSettings) -> ToolPlan:
    tools = [_chat_tool(index, tool) for index, tool in enumerate(request.tools or [])]
    return plan_tool_calls(
        tools, _chat_tool_choice(request.tool_choice), request.parallel_tool_calls is not False,
        settings,
    )


def _chat_tool(index: int, tool: dict[str, Any]) -> ChatTool:
    """{"type": "function", "name", ...} -> chat's {"type": "function", "function": {...}}."""
    param = f"tools[{index}]"
    kind = tool.get("type")
    if kind != "function":
        raise invalid_param(
            f"{param}.type {kind!r} is not supported: only function tools are served", "tools"
        )
    try:
        function = FunctionDefinition.model_validate(
            {key: tool[key] for key in _FUNCTION_FIELDS if key in tool}
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise invalid_param(f"{param}.{where}: {first['msg']}", "tools") from None
    return ChatTool(function=function)


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | NamedToolChoice | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("name"), str)):
        return NamedToolChoice(function=NamedFunction(name=choice["name"]))
    raise invalid_param(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )


def new_item_id() -> str:
    return f"fc_{uuid.uuid4().hex}"


def output_items(
    message_id: str, status: str, content: str | None, calls: list[FunctionCallItem]
) -> list[OutputItem]:
    """A reply's items: its text as a message (none when it only calls), then its calls."""
    items: list[OutputItem] = []
    if content is not None:
        items.append(OutputMessage(id=message_id, status=status,
                                   content=[OutputText(text=content)]))
    return [*items, *calls]


def assistant_message(output: list[OutputItem]) -> dict[str, Any]:
    """The reply as a chat message, for a continuation (previous_response_id)."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if isinstance(item, OutputMessage):
            message["content"] = "".join(part.text for part in item.content)
        else:
            message.setdefault("tool_calls", []).append({
                "id": item.call_id, "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            })
    return message
