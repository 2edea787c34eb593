"""A chat completion's text -> message fields: reasoning_content, content and tool_calls.

`ChatOutputParser` reads the whole text so far (reasoning parser first, then the tool mode on
what follows the reasoning); for a whole answer it is read once, finished. A stream reads it
again after every delta (`ChoiceStream`) and sends what is new since the last read: reasoning
and content as text fragments, each tool call as its header (index, id, type, name) once its
name is complete, then fragments of its arguments' raw text. Every part only ever grows (the
parsers hold back what could still change), so the fragments add up to the final message.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from pagoda.adapters.openai.protocol import (
    AssistantMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from pagoda.adapters.openai.reasoning import ReasoningParser
from pagoda.adapters.openai.tools.json_scan import PartialCall
from pagoda.adapters.openai.tools.modes import ToolMode


@dataclass(slots=True)
class ParsedOutput:
    reasoning: str | None
    content: str | None
    calls: list[PartialCall]


class ChatOutputParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolMode | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.split(text, finished)
        if self.tools is None:
            return ParsedOutput(reasoning, text, [])
        content, calls = self.tools.parse(text, finished)
        return ParsedOutput(reasoning, content, calls)

    def message(self, text: str) -> tuple[AssistantMessage, bool]:
        """The message of a finished completion, and whether it calls tools."""
        parsed = self.parse(text, finished=True)
        calls = [
            ToolCall(id=new_call_id(),
                     function=FunctionCall(name=call.name, arguments=call.arguments or "{}"))
            for call in parsed.calls if call.name is not None
        ]
        content = parsed.content if parsed.content or not calls else None
        message = AssistantMessage(
            content=content, tool_calls=calls, reasoning_content=parsed.reasoning
        )
        return message, bool(calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class _SentCall:
    id: str
    arguments_sent: int = 0


@dataclass(slots=True)
class ChoiceStream:
    """What one streamed choice has sent so far."""

    parser: ChatOutputParser
    text: str = ""
    reasoning_sent: int = 0
    content_sent: int = 0
    calls: list[_SentCall] = field(default_factory=list)

    @property
    def called_tools(self) -> bool:
        return bool(self.calls)

    def feed(self, delta_text: str, finished: bool) -> DeltaMessage | None:
        """The delta to send after `delta_text`, or None when nothing can be sent yet."""
        self.text += delta_text
        parsed = self.parser.parse(self.text, finished)
        reasoning = self._new_text(parsed.reasoning, "reasoning_sent")
        content = self._new_text(parsed.content, "content_sent")
        tool_calls = self._new_calls(parsed.calls)
        if reasoning is None and content is None and not tool_calls:
            return None
        return DeltaMessage(content=content, reasoning_content=reasoning,
                            tool_calls=tool_calls or None)

    def _new_text(self, text: str | None, sent_field: str) -> str | None:
        sent = getattr(self, sent_field)
        if text is None or len(text) <= sent:
            return None
        setattr(self, sent_field, len(text))
        return text[sent:]

    def _new_calls(self, calls: list[PartialCall]) -> list[DeltaToolCall]:
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self.calls):
                if call.name is None:
                    break  # its header waits for the whole name; later calls wait for it
                self.calls.append(_SentCall(new_call_id()))
                sent = self.calls[index]
                arguments = self._new_arguments(sent, call) or ""
                deltas.append(DeltaToolCall(
                    index=index, id=sent.id, type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=arguments),
                ))
                continue
            arguments = self._new_arguments(self.calls[index], call)
            if arguments:
                deltas.append(DeltaToolCall(
                    index=index, function=DeltaFunctionCall(arguments=arguments)
                ))
        return deltas

    @staticmethod
    def _new_arguments(sent: _SentCall, call: PartialCall) -> str | None:
        arguments = call.arguments or ""
        if len(arguments) <= sent.arguments_sent:
            return None
        new = arguments[sent.arguments_sent:]
        sent.arguments_sent = len(arguments)
        return new
