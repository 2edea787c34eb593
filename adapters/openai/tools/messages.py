"""An assistant message's earlier tool calls, as chat templates read them."""

from __future__ import annotations

import json
from typing import Any

from pagoda.adapters.openai.errors import invalid_param


def tool_calls(param: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`calls` ({"id", "type", "function": {"name", "arguments"}}) with each arguments JSON text
    parsed into an object: templates write `arguments | tojson` (Qwen's, Llama 3's), as vLLM
    renders them. Arguments that are not a JSON object stay text."""
    rendered = []
    for index, call in enumerate(calls):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid_param(
                f"{param}.tool_calls[{index}] must have a function with a name",
                f"{param}.tool_calls",
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                arguments = parsed
        rendered.append({**call, "function": {**function, "arguments": arguments}})
    return rendered
