"""The bounded tool schemas the tool-calling tests declare (chat's and the Responses API's): the
random-weight demo model writes arguments that validate only because the grammar bounds them."""

from __future__ import annotations

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}


def regex_literal(text: str) -> str:
    """`text` as a regex matching only itself (for guided_regex)."""
    return "".join("\\" + char if char in r"\.^$*+?()[]{}|" else char for char in text)
