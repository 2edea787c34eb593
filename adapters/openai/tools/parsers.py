"""Tool parsers for `tool_choice: auto` (`--tool-call-parser`): where, in what a model writes,
its tool calls begin. The calls themselves are scanned by json_scan.

Each parser splits the output so far into the text that is surely content and the text that
holds the calls. While the output is unfinished, a tail that could be the start of the marker
(say "<tool_ca") is held back from the content, so streamed content never shows a marker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ToolParser(ABC):
    name: str
    # The marker is a special token, which would be dropped from the text unless kept.
    reads_special_tokens: bool = False

    @abstractmethod
    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        """(content, calls): the content before the calls (held-back marker prefix excluded),
        and the text from the calls' start marker on, or None when no call has begun."""


class MarkerToolParser(ToolParser):
    """Calls start at a marker: content before it, calls (as JSON) after it."""

    marker: str

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        start = text.find(self.marker)
        if start >= 0:
            return text[:start], text[start + len(self.marker):]
        if finished:
            return text, None
        return text[:len(text) - held_back(text, self.marker)], None


class HermesToolParser(MarkerToolParser):
    """Hermes 2 Pro, Qwen 2.5 and the demo model: `<tool_call>{json}</tool_call>` blocks."""

    name = "hermes"
    marker = "<tool_call>"


class MistralToolParser(MarkerToolParser):
    """Mistral: `[TOOL_CALLS][{json}, ...]` ([TOOL_CALLS] is a special token)."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    reads_special_tokens = True


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON tool calling: the whole output is `{"name": ..., "parameters": ...}`
    (several separated by `;`), optionally after <|python_tag|>; anything else is content."""

    name = "llama3_json"
    python_tag = "<|python_tag|>"
    reads_special_tokens = True

    def split(self, text: str, finished: bool) -> tuple[str, str | None]:
        stripped = text.lstrip()
        if stripped.startswith(self.python_tag):
            return "", stripped[len(self.python_tag):]
        if stripped.startswith("{"):
            return "", stripped
        if not finished and self.python_tag.startswith(stripped):
            return "", None  # nothing yet, or the tag's beginning
        return text, None


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, MistralToolParser, Llama3JsonToolParser)
}


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
