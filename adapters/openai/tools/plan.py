"""`tools` and `tool_choice` -> what the chat template is given, the grammar a forced call runs
under, and how the calls are read back (modes.py).

tool_choice (default "auto" when tools are given, as in vLLM):
- "none": the tools are rendered, the model writes text;
- "auto": the model may call tools; its output is read by the server's --tool-call-parser, and
  only with --enable-auto-tool-choice (vLLM refuses it otherwise, and so does this);
- "required": a grammar forces a JSON array of one or more {"name", "arguments"} calls, each
  with one of the tools' names and arguments valid for that tool's parameters;
- {"type": "function", "function": {"name": ...}}: a grammar forces that tool's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.adapters.openai.tools.modes import AutoCalls, NamedCall, RequiredCalls, ToolMode
from pagoda.adapters.openai.tools.parsers import TOOL_PARSERS
from pagoda.backend.structured import StructuredOutputsParams

# A tool declared without parameters takes a JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(slots=True)
class ToolPlan:
    template_tools: list[dict[str, Any]] | None = None  # the chat template's `tools`
    forced: StructuredOutputsParams | None = None  # the grammar of a forced call
    mode: ToolMode | None = None  # None: the output is plain text
    reads_special_tokens: bool = False


def plan_tools(request: ChatCompletionRequest, settings: ServerSettings) -> ToolPlan:
    return plan_tool_calls(
        request.tools or [], request.tool_choice, request.parallel_tool_calls is not False,
        settings,
    )


def plan_tool_calls(
    tools: list[ChatTool], choice: str | NamedToolChoice | None, parallel: bool,
    settings: ServerSettings,
) -> ToolPlan:
    """The plan for chat's `tools` and `tool_choice`; the Responses API converts its own."""
    if not tools:
        if choice not in (None, "none"):
            raise invalid_param("tool_choice needs tools", "tool_choice")
        return ToolPlan()
    _check_unique_names(tools)
    template_tools = [tool.model_dump(exclude_none=True) for tool in tools]
    if choice == "none":
        return ToolPlan(template_tools)
    if choice is None or choice == "auto":
        return _auto(settings, template_tools, parallel)
    if choice == "required":
        schema = _required_schema(tools, parallel)
        return ToolPlan(template_tools, StructuredOutputsParams(json=schema), RequiredCalls())
    assert isinstance(choice, NamedToolChoice)
    tool = next((tool for tool in tools if tool.function.name == choice.function.name), None)
    if tool is None:
        raise invalid_param(
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            "tool_choice",
        )
    schema = tool.function.parameters or ANY_OBJECT
    return ToolPlan(
        template_tools, StructuredOutputsParams(json=schema), NamedCall(tool.function.name)
    )


def _auto(
    settings: ServerSettings, template_tools: list[dict[str, Any]], parallel: bool
) -> ToolPlan:
    if not settings.enable_auto_tool_choice or settings.tool_call_parser is None:
        raise invalid_param(
            '"auto" tool choice (the default with tools) requires the server to run with '
            "--enable-auto-tool-choice and --tool-call-parser; send tool_choice \"required\", "
            '"none" or a named function instead',
            "tool_choice",
        )
    parser = TOOL_PARSERS[settings.tool_call_parser]()
    return ToolPlan(
        template_tools, mode=AutoCalls(parser, parallel),
        reads_special_tokens=parser.reads_special_tokens,
    )


def _required_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """An array of calls, each one of the tools with arguments valid for it."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "arguments": tool.function.parameters or ANY_OBJECT,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _check_unique_names(tools: list[ChatTool]) -> None:
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool.function.name in seen:
            raise invalid_param(
                f"tools[{index}]: the name {tool.function.name!r} is used twice",
                f"tools[{index}].function.name",
            )
        seen.add(tool.function.name)
