"""A streamed response's output items and their events, as OpenAI sends them.

The reply's text is a message item (output_item.added, content_part.added, output_text.delta...,
output_text.done, content_part.done, output_item.done); each tool call is a function_call item
(output_item.added with its name, function_call_arguments.delta..., function_call_arguments.done,
output_item.done). An item opens when its first text or call header arrives and closes when the
next one opens or the reply ends; the items as closed are the final response's output, so the
deltas add up to it by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pagoda.adapters.openai.protocol import DeltaToolCall
from pagoda.adapters.openai.responses_protocol import (
    FunctionCallItem,
    OutputMessage,
    OutputText,
    ResponseEvent,
)
from pagoda.adapters.openai.responses_tools import OutputItem, new_item_id

EventMaker = Callable[..., ResponseEvent]


class OutputWriter:
    def __init__(self, event: EventMaker, message_id: str) -> None:
        self.event = event
        self.message_id = message_id
        self.items: list[OutputItem] = []
        self.open = False  # the last item is still being written
        self.text = ""  # the message's text so far
        self.arguments: list[str] = []  # each call's arguments so far, by call index
        self.call_items: list[int] = []  # each call's output index

    def content(self, delta: str) -> Iterator[ResponseEvent]:
        if not self._message_is_open():
            yield from self.open_message()
        self.text += delta
        yield self.event("response.output_text.delta", **self._part(), delta=delta, logprobs=[])

    def open_message(self) -> Iterator[ResponseEvent]:
        yield from self._close("completed")
        message = OutputMessage(id=self.message_id, status="in_progress", content=[])
        yield from self._add(message)
        yield self.event("response.content_part.added", **self._part(),
                         part=OutputText(text="").model_dump())

    def call(self, delta: DeltaToolCall) -> Iterator[ResponseEvent]:
        function = delta.function
        assert function is not None
        if delta.id is not None:  # a new call's header: its id and whole name
            yield from self._close("completed")
            assert function.name is not None
            self.call_items.append(len(self.items))
            self.arguments.append("")
            yield from self._add(FunctionCallItem(
                id=new_item_id(), call_id=delta.id, name=function.name, arguments="",
                status="in_progress",
            ))
        if function.arguments:
            self.arguments[delta.index] += function.arguments
            index = self.call_items[delta.index]
            yield self.event("response.function_call_arguments.delta", output_index=index,
                             item_id=self.items[index].id, delta=function.arguments)

    def finish(self, status: str) -> Iterator[ResponseEvent]:
        """Closes the last item, with the response's status; a reply with no item at all gets
        an empty message, as a reply without tools has."""
        if not self.items:
            yield from self.open_message()
        yield from self._close(status)

    def _message_is_open(self) -> bool:
        return self.open and isinstance(self.items[-1], OutputMessage)

    def _part(self) -> dict[str, Any]:
        return {"item_id": self.message_id, "output_index": len(self.items) - 1,
                "content_index": 0}

    def _add(self, item: OutputItem) -> Iterator[ResponseEvent]:
        self.items.append(item)
        self.open = True
        yield self.event("response.output_item.added", output_index=len(self.items) - 1,
                         item=item.model_dump())

    def _close(self, status: str) -> Iterator[ResponseEvent]:
        if not self.open:
            return
        self.open = False
        index = len(self.items) - 1
        item = self.items[index]
        if isinstance(item, OutputMessage):
            part = OutputText(text=self.text)
            item = OutputMessage(id=item.id, status=status, content=[part])
            yield self.event("response.output_text.done", **self._part(), text=self.text,
                             logprobs=[])
            yield self.event("response.content_part.done", **self._part(),
                             part=part.model_dump())
        else:
            arguments = self.arguments[self.call_items.index(index)]
            item = item.model_copy(update={"arguments": arguments, "status": status})
            yield self.event("response.function_call_arguments.done", output_index=index,
                             item_id=item.id, name=item.name, arguments=arguments)
        self.items[index] = item
        yield self.event("response.output_item.done", output_index=index,
                         item=item.model_dump())
