"""Tool calls in model output that is still being written: raw JSON text, scanned, not parsed.

A call is a JSON object `{"name": ..., "arguments": {...}}` (Llama 3 says "parameters"). The
calls are the objects at the top level of the text: alone, in an array, separated by `;`, or
between tags such as <tool_call>...</tool_call> (text outside objects is skipped). For each, the
name is known once its string is closed, and the arguments are the raw text of their value so
far: it only ever grows as the output grows, so a stream can send it in fragments whose
concatenation is exactly the final arguments text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\n\r"


@dataclass(slots=True)
class PartialCall:
    name: str | None  # None until the name's string is complete
    arguments: str | None  # raw JSON text of the arguments so far; None until they begin
    complete: bool  # the call's object is closed
    text: str = ""  # the call's own raw text, so far

    def is_valid(self) -> bool:
        """A complete object with a name and JSON arguments."""
        if not self.complete or self.name is None:
            return False
        try:
            json.loads(self.text)
        except json.JSONDecodeError:
            return False
        return True


def scan_calls(text: str) -> list[PartialCall]:
    return [_call(text[start:end], closed) for start, end, closed in _top_level_objects(text)]


def _call(obj: str, closed: bool) -> PartialCall:
    members = _members(obj)
    name = None
    name_span = members.get("name")
    if name_span is not None and name_span[1] is not None:
        name = _load_string(obj[name_span[0]:name_span[1]])
    arguments = None
    for key in ARGUMENT_KEYS:
        if key in members:
            start, end = members[key]
            arguments = obj[start:end] if end is not None else obj[start:]
            break
    return PartialCall(name, arguments, closed, obj)


def _top_level_objects(text: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end, closed) of each object opened outside any other object."""
    start = text.find("{")
    while start >= 0:
        end = _value_end(text, start)
        if end is None:
            yield start, len(text), False
            return
        yield start, end, True
        start = text.find("{", end)


def _members(obj: str) -> dict[str, tuple[int, int | None]]:
    """Key -> (start, end) of each top-level member's raw value in an object's text, end None
    for a value the text has not finished. Stops at the first member it cannot read whole."""
    members: dict[str, tuple[int, int | None]] = {}
    index = _skip_whitespace(obj, 1)
    while index < len(obj) and obj[index] == '"':
        key_end = _string_end(obj, index)
        if key_end is None:
            break
        key = _load_string(obj[index:key_end])
        value_start = _after(obj, key_end, ":")
        if key is None or value_start is None or value_start >= len(obj):
            break
        value_end = _value_end(obj, value_start)
        members[key] = (value_start, value_end)
        next_member = None if value_end is None else _after(obj, value_end, ",")
        if next_member is None:
            break
        index = next_member
    return members


def _after(text: str, index: int, separator: str) -> int | None:
    """Past `separator` (and the whitespace around it) from text[index] on; None when the text
    has something else there, or ends."""
    index = _skip_whitespace(text, index)
    if index >= len(text) or text[index] != separator:
        return None
    return _skip_whitespace(text, index + 1)


def _load_string(raw: str) -> str | None:
    """A JSON string's value; None for text that is not one (a number, a bad escape)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def _skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def _string_end(text: str, index: int) -> int | None:
    """The index after the string starting at text[index] ('"'), None if it is not closed."""
    escaped = False
    for position in range(index + 1, len(text)):
        char = text[position]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return position + 1
    return None


def _value_end(text: str, index: int) -> int | None:
    """The index after the JSON value starting at text[index], None if the text ends first (a
    number at the very end may still grow, so it is not finished either)."""
    char = text[index]
    if char == '"':
        return _string_end(text, index)
    if char in "{[":
        depth = 0
        in_string = escaped = False
        for position in range(index, len(text)):
            char = text[position]
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "{[":
                depth += 1
            elif char in "}]":
                depth -= 1
                if depth == 0:
                    return position + 1
        return None
    for position in range(index, len(text)):
        if text[position] in ",}]" or text[position] in _WHITESPACE:
            return position
    return None
