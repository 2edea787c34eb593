"""Reading tool calls and reasoning out of model text: whole, and streamed a piece at a time
(the streamed fragments must add up to the whole answer, whatever the split)."""

from __future__ import annotations

import json

import pytest

from pagoda.adapters.openai.chat_output import ChatOutputParser, ChoiceStream
from pagoda.adapters.openai.reasoning import DeepSeekR1ReasoningParser, Qwen3ReasoningParser
from pagoda.adapters.openai.tools.json_scan import scan_calls
from pagoda.adapters.openai.tools.modes import AutoCalls, NamedCall, RequiredCalls
from pagoda.adapters.openai.tools.parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris \\"}{\\"", "days": [1, {"x": 2}]}}'
WEATHER_ARGS = '{"city": "Paris \\"}{\\"", "days": [1, {"x": 2}]}'
ADD = '{"name": "add", "arguments": {"a": 1, "b": 2.5}}'


def test_scan_finds_calls_with_their_raw_arguments():
    calls = scan_calls(f"[{WEATHER}, {ADD}]")
    assert [(c.name, c.arguments, c.complete) for c in calls] == [
        ("get_weather", WEATHER_ARGS, True), ("add", '{"a": 1, "b": 2.5}', True)]
    assert all(call.is_valid() for call in calls)
    # Llama 3 names them parameters, and separates calls with ";".
    (call,) = scan_calls('{"name": "f", "parameters": {"q": "a;b"}}')
    assert (call.name, call.arguments) == ("f", '{"q": "a;b"}')


def test_scan_of_unfinished_text_only_grows():
    text = f"[{WEATHER}, {ADD}]"
    previous: list[tuple[str | None, str]] = []
    for end in range(len(text) + 1):
        calls = scan_calls(text[:end])
        current = [(c.name, c.arguments or "") for c in calls]
        assert len(current) >= len(previous)
        for (old_name, old_args), (new_name, new_args) in zip(previous, current):
            assert old_name is None or old_name == new_name  # a name appears whole, once
            assert new_args.startswith(old_args)
        previous = current
    assert not scan_calls('[{"name": "get_wea')[0].name  # a partial name is not reported


@pytest.mark.parametrize(("parser", "text", "content", "names"), [
    (HermesToolParser(), f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{ADD}"
     "\n</tool_call>", "Let me look.\n", ["get_weather", "add"]),
    (HermesToolParser(), "No tools <tool here.", "No tools <tool here.", []),
    (MistralToolParser(), f"[TOOL_CALLS][{WEATHER}, {ADD}]", None, ["get_weather", "add"]),
    (Llama3JsonToolParser(), '<|python_tag|>{"name": "f", "parameters": {}}; '
     '{"name": "g", "parameters": {"x": 1}}', None, ["f", "g"]),
    (Llama3JsonToolParser(), "Plain text {not a call}", "Plain text {not a call}", []),
    # Not valid JSON once finished: all content, as vLLM answers it.
    (HermesToolParser(), '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>',
     '<tool_call>{"name": "f", "arguments": {"a": }}</tool_call>', []),
])
def test_auto_parsers(parser, text, content, names):
    message, called = ChatOutputParser(None, AutoCalls(parser, parallel=True)).message(text)
    assert message.content == content
    assert [call.function.name for call in message.tool_calls] == names
    assert called == bool(names)
    for call in message.tool_calls:
        json.loads(call.function.arguments)
        assert call.id.startswith("call_") and call.type == "function"


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    (DeepSeekR1ReasoningParser(), "thinking hard</think>The answer.", "thinking hard",
     "The answer."),
    (DeepSeekR1ReasoningParser(), "<think>a</think>b", "a", "b"),
    (DeepSeekR1ReasoningParser(), "never closed", "never closed", ""),
    (Qwen3ReasoningParser(), "<think>\nhmm\n</think>\n\nYes.", "\nhmm\n", "\n\nYes."),
    (Qwen3ReasoningParser(), "No thinking here.", None, "No thinking here."),
])
def test_reasoning_parsers(parser, text, reasoning, content):
    message, _ = ChatOutputParser(parser, None).message(text)
    assert (message.reasoning_content, message.content) == (reasoning, content)


def streamed(parser: ChatOutputParser, text: str, piece: int) -> dict:
    """The message a client assembles from the deltas of `text` fed `piece` characters at a
    time, as the openai SDK accumulates them."""
    stream = ChoiceStream(parser)
    message: dict = {"content": "", "reasoning_content": "", "tool_calls": []}
    for start in range(0, len(text) + 1, piece):
        delta = stream.feed(text[start:start + piece], start + piece > len(text))
        if delta is None:
            continue
        message["content"] += delta.content or ""
        message["reasoning_content"] += delta.reasoning_content or ""
        for call in delta.tool_calls or []:
            if call.index == len(message["tool_calls"]):
                assert call.id and call.type == "function" and call.function.name
                message["tool_calls"].append({"name": call.function.name, "arguments": ""})
            else:
                assert call.id is None and call.function.name is None
            message["tool_calls"][call.index]["arguments"] += call.function.arguments or ""
    return message


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(("reasoning", "tools", "text"), [
    (None, AutoCalls(HermesToolParser(), True),
     f"Sure.<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{ADD}</tool_call>"),
    (None, AutoCalls(HermesToolParser(), True), "Just words, <tool_ no call."),
    (None, AutoCalls(MistralToolParser(), True), f"[TOOL_CALLS][{WEATHER},{ADD}]"),
    (None, AutoCalls(Llama3JsonToolParser(), True), '{"name": "f", "parameters": {"x": "y"}}'),
    (None, NamedCall("get_weather"), WEATHER_ARGS),
    (None, RequiredCalls(), f"[{WEATHER}, {ADD}]"),
    (Qwen3ReasoningParser(), AutoCalls(HermesToolParser(), True),
     f"<think>call it</think>Ok<tool_call>{ADD}</tool_call>"),
    (DeepSeekR1ReasoningParser(), None, "a </thin b</think> c"),
])
def test_streamed_deltas_add_up_to_the_whole_message(piece, reasoning, tools, text):
    parser = ChatOutputParser(reasoning, tools)
    whole, _ = parser.message(text)
    message = streamed(parser, text, piece)
    assert message["content"] == (whole.content or "")
    assert message["reasoning_content"] == (whole.reasoning_content or "")
    assert message["tool_calls"] == [
        {"name": call.function.name, "arguments": call.function.arguments}
        for call in whole.tool_calls
    ]
