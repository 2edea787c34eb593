"""Tool calls and structured outputs through the official openai SDK: forced tool calls (named,
required) whose arguments validate, tool_choice auto read by the hermes parser, an agent loop's
second turn, response_format and vLLM's extras, streamed and not, and the 400s."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from openai_server import TOOLS_MAX_MODEL_LEN, running_server
from pydantic import BaseModel, Field
from tool_schemas import ADD_PARAMETERS, PARAMETERS, regex_literal
from transformers import AutoTokenizer

TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"the {name} tool",
                                      "parameters": parameters}}
    for name, parameters in PARAMETERS.items()
]
CHAT = [{"role": "user", "content": "What is the weather in Paris this week?"}]
WEATHER_CHOICE = {"type": "function", "function": {"name": "get_weather"}}


class Forecast(BaseModel):
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]
    alerts: bool


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def close_array_bias(tokenizer) -> dict[str, int]:
    return {str(tokenizer.convert_tokens_to_ids("]")): 100}


@pytest.fixture(scope="module")
def client(tools_server) -> OpenAI:
    return OpenAI(base_url=tools_server.v1, api_key=tools_server.api_key, max_retries=0)


def chat(client: OpenAI, **kwargs):
    kwargs.setdefault("messages", CHAT)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 150)
    return client.chat.completions.create(model="pagoda-test", **kwargs)


def is_valid(text: str, schema: dict) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True


def assert_valid_call(call) -> None:
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5, n=2)])
def test_named_tool_choice_is_forced_and_valid(client, sampling):
    response = chat(client, tools=TOOLS, tool_choice=WEATHER_CHOICE, **sampling)
    assert len(response.choices) == sampling.get("n", 1)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        assert_valid_call(call)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=9)])
def test_required_tool_choice_calls_declared_tools(client, sampling, close_array_bias):
    single = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  **sampling)
    # Parallel calls: the random model would go on calling; a bias on "]" (where the grammar
    # allows it: after a whole call) ends the list.
    closed = chat(client, tools=TOOLS, tool_choice="required", logit_bias=close_array_bias,
                  **sampling)
    for response in (single, closed):
        (choice,) = response.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert_valid_call(call)


def test_parallel_forced_calls_are_each_valid(client):
    message = chat(client, tools=TOOLS, tool_choice="required", max_tokens=300).choices[0]
    # Greedy, it calls the tools over and over until max_tokens cuts the last call short.
    assert message.finish_reason == "length" and len(message.message.tool_calls) > 2
    for call in message.message.tool_calls[:-1]:
        assert_valid_call(call)


def streamed_calls(client: OpenAI, **kwargs) -> tuple[list[dict], str | None]:
    """The calls a client assembles from a stream's deltas, and the finish_reason."""
    calls: list[dict] = []
    finish_reason = None
    for chunk in chat(client, stream=True, **kwargs):
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        for delta in choice.delta.tool_calls or []:
            if delta.index == len(calls):
                assert delta.id.startswith("call_") and delta.type == "function"
                calls.append({"name": delta.function.name, "arguments": ""})
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls, finish_reason


@pytest.mark.parametrize("tool_choice", [WEATHER_CHOICE, "required"])
def test_streamed_tool_calls_match_the_whole_answer(client, tool_choice, close_array_bias):
    kwargs = dict(tools=TOOLS, tool_choice=tool_choice, logit_bias=close_array_bias)
    whole = chat(client, **kwargs).choices[0].message.tool_calls
    calls, finish_reason = streamed_calls(client, **kwargs)
    assert finish_reason == "tool_calls"
    assert calls == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole]


def test_auto_tool_choice_reads_hermes_calls(client):
    # The demo model never calls a tool by itself: a regex makes it write what the demo
    # template asks for, a <tool_call> block, which the server's hermes parser then reads.
    call = '{"name": "add", "arguments": {"a": 2, "b": 40}}'
    regex = r"Adding\.\n<tool_call>\n" + regex_literal(call) + r"\n</tool_call>"
    response = chat(client, tools=TOOLS, extra_body={"guided_regex": regex})
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Adding.\n"
    (tool_call,) = choice.message.tool_calls
    assert (tool_call.function.name, json.loads(tool_call.function.arguments)) == (
        "add", {"a": 2, "b": 40})
    calls, finish_reason = streamed_calls(client, tools=TOOLS, extra_body={"guided_regex": regex})
    assert calls == [{"name": "add", "arguments": '{"a": 2, "b": 40}'}]
    assert finish_reason == "tool_calls"
    # tool_choice none: the tools are shown to the model, and its text is only text.
    plain = chat(client, tools=TOOLS, tool_choice="none", extra_body={"guided_regex": regex})
    message = plain.choices[0].message
    assert message.tool_calls == [] and "<tool_call>" in message.content


def test_agent_loop_second_turn(client, tools_server):
    first = chat(client, tools=TOOLS, tool_choice=WEATHER_CHOICE).choices[0].message
    conversation = [
        *CHAT,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "Sunny, 24 C"},
    ]
    second = chat(client, messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > chat(client, tools=TOOLS, tool_choice="none",
                                             max_tokens=1).usage.prompt_tokens
    # The call and the result are in the prompt the template rendered.
    rendered = tools_server.tokenize(conversation, tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in rendered
    assert "<tool_response>\nSunny, 24 C\n</tool_response>" in rendered


def test_response_format_json_schema_parses(client):
    for sampling in (dict(temperature=0), dict(temperature=1.0, seed=3)):
        completion = client.chat.completions.parse(
            model="pagoda-test", messages=CHAT, response_format=Forecast, max_tokens=150,
            **sampling,
        )
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Forecast)


def test_response_format_json_object(client, tokenizer):
    close = tokenizer.convert_tokens_to_ids("}")
    response = chat(client, response_format={"type": "json_object"}, logit_bias={str(close): 100})
    assert json.loads(response.choices[0].message.content) == {}


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_choice": ["sunny", "rainy"]}, lambda text: text in ("sunny", "rainy")),
    ({"structured_outputs": {"choice": ["sunny", "rainy"]}},
     lambda text: text in ("sunny", "rainy")),
    ({"guided_regex": "[0-9]{3}"}, lambda text: len(text) == 3 and text.isdigit()),
    ({"structured_outputs": {"regex": "[a-c]{4}"}}, lambda text: len(text) == 4),
    ({"guided_json": ADD_PARAMETERS}, lambda text: is_valid(text, ADD_PARAMETERS)),
    ({"structured_outputs": {"json": json.dumps(ADD_PARAMETERS)}},
     lambda text: is_valid(text, ADD_PARAMETERS)),
    ({"guided_grammar": 'root ::= "x" [0-9]+ "y"'},
     lambda text: text[0] == "x" and text[-1] == "y"),
])
def test_vllm_extras(client, extra, check):
    response = chat(client, extra_body=extra)
    assert response.choices[0].finish_reason == "stop"
    assert check(response.choices[0].message.content), response.choices[0].message.content
    completion = client.completions.create(model="pagoda-test", prompt="Answer:", max_tokens=150,
                                           temperature=0, extra_body=extra)
    assert check(completion.choices[0].text)


def test_streamed_json_schema_with_two_samples(client):
    texts = ["", ""]
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "add", "schema": ADD_PARAMETERS, "strict": True}}
    for chunk in chat(client, stream=True, n=2, temperature=1.0, seed=1,
                      response_format=response_format):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), ADD_PARAMETERS)


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[*TOOLS, TOOLS[0]], tool_choice="required"), "tools[2].function.name"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
     "tool_choice"),
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (dict(extra_body={"guided_regex": "("}), "guided_regex"),
    (dict(extra_body={"guided_json": {"type": 5}}), "guided_json"),
    (dict(extra_body={"guided_choice": []}), "guided_choice"),
    (dict(extra_body={"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}),
     "structured_outputs"),
    (dict(messages=[*CHAT, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
    (dict(messages=[*CHAT, {"role": "assistant", "tool_calls": [{"id": "x"}]}]),
     "messages[1].tool_calls"),
    (dict(n=2, extra_body={"guided_regex": "a+", "use_beam_search": True}), "guided_regex"),
])
def test_bad_tool_and_format_fields_are_400_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, **kwargs)
    assert caught.value.body["param"] == param, caught.value.body


@pytest.fixture(scope="module")
def reasoning_server(demo_model_dir):
    """A server with a reasoning parser and without auto tool choice."""
    with running_server(demo_model_dir, TOOLS_MAX_MODEL_LEN,
                        reasoning_parser="deepseek_r1") as server:
        yield server


def test_auto_tool_choice_needs_the_flag(reasoning_server):
    client = OpenAI(base_url=reasoning_server.v1, api_key=reasoning_server.api_key, max_retries=0)
    for tool_choice in ("auto", openai.NOT_GIVEN):
        with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice") as caught:
            chat(client, tools=TOOLS, tool_choice=tool_choice)
        assert caught.value.body["param"] == "tool_choice"


def test_reasoning_content(reasoning_server, client):
    reasoner = OpenAI(base_url=reasoning_server.v1, api_key=reasoning_server.api_key,
                      max_retries=0)
    text = chat(client, max_tokens=12).choices[0].message.content
    # The demo model never writes </think>: for DeepSeek R1 all of it is reasoning.
    message = chat(reasoner, max_tokens=12).choices[0].message
    assert (message.reasoning_content, message.content) == (text, "")
    streamed = ""
    for chunk in chat(reasoner, max_tokens=12, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        streamed += getattr(delta, "reasoning_content", None) or ""
    assert streamed == text
