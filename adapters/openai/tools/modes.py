"""How a request's tool calls are read out of its output, per tool_choice.

- named: the whole output is the arguments of the named function (forced by a grammar);
- required: the whole output is a JSON array of {"name", "arguments"} (forced by a grammar);
- auto: the tool parser finds where calls begin; what comes before is content.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.adapters.openai.tools.json_scan import PartialCall, scan_calls
from pagoda.adapters.openai.tools.parsers import ToolParser


class ToolMode(ABC):
    @abstractmethod
    def parse(self, text: str, finished: bool) -> tuple[str | None, list[PartialCall]]:
        """(content, calls) of the output so far; content None when there is none."""


class NamedCall(ToolMode):
    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, text: str, finished: bool) -> tuple[str | None, list[PartialCall]]:
        return None, [PartialCall(self.name, text, finished, text)]


class RequiredCalls(ToolMode):
    def parse(self, text: str, finished: bool) -> tuple[str | None, list[PartialCall]]:
        return None, scan_calls(text)


class AutoCalls(ToolMode):
    def __init__(self, parser: ToolParser, parallel: bool) -> None:
        self.parser = parser
        self.parallel = parallel

    def parse(self, text: str, finished: bool) -> tuple[str | None, list[PartialCall]]:
        content, calls_text = self.parser.split(text, finished)
        if calls_text is None:
            return content, []
        calls = scan_calls(calls_text)
        if finished and not all(call.is_valid() for call in calls):
            # Not well-formed calls after all (vLLM answers the same way): it is all content.
            return text, []
        if not self.parallel:
            calls = calls[:1]
        return content or None, calls
