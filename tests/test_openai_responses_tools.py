"""Function tools in the Responses API through the openai SDK, on the tool-calling server: forced
calls that validate, streamed argument deltas that add up, auto calls read by the hermes parser,
an agent's second turn (function_call_output, also after previous_response_id), and the 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI
from tool_schemas import PARAMETERS, regex_literal

TOOLS = [
    {"type": "function", "name": name, "description": f"the {name} tool",
     "parameters": parameters, "strict": True}
    for name, parameters in PARAMETERS.items()
]
QUESTION = "What is the weather in Paris this week?"
WEATHER_CHOICE = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def client(tools_server) -> OpenAI:
    return OpenAI(base_url=tools_server.v1, api_key=tools_server.api_key, max_retries=0)


def respond(client: OpenAI, **kwargs):
    kwargs.setdefault("input", QUESTION)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_output_tokens", 150)
    return client.responses.create(model="pagoda-test", **kwargs)


def assert_valid_call(item) -> None:
    assert item.type == "function_call" and item.status == "completed"
    assert item.id.startswith("fc_") and item.call_id.startswith("call_")
    jsonschema.validate(json.loads(item.arguments), PARAMETERS[item.name])


@pytest.mark.parametrize("tool_choice", [WEATHER_CHOICE, "required"])
def test_forced_call_is_valid(client, tool_choice):
    response = respond(client, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert response.status == "completed"
    (item,) = response.output
    assert_valid_call(item)
    if tool_choice == WEATHER_CHOICE:
        assert item.name == "get_weather"
        assert response.tool_choice.name == "get_weather"
    assert [tool.name for tool in response.tools] == ["get_weather", "add"]


def test_streamed_arguments_add_up(client):
    kwargs = dict(tools=TOOLS, tool_choice=WEATHER_CHOICE)
    whole = respond(client, **kwargs).output[0]
    events = list(respond(client, stream=True, **kwargs))
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert types[-4:] == ["response.function_call_arguments.delta",
                          "response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    added = events[2].item
    assert added.type == "function_call" and added.name == "get_weather"
    assert added.status == "in_progress" and added.arguments == ""
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert {e.item_id for e in deltas} == {added.id} and len(deltas) > 1
    arguments = "".join(e.delta for e in deltas)
    assert arguments == events[-3].arguments == events[-2].item.arguments == whole.arguments
    (final,) = events[-1].response.output
    assert_valid_call(final)
    assert (final.id, final.call_id) == (added.id, added.call_id)
    # The SDK's stream helper accumulates the argument deltas into its snapshot.
    with client.responses.stream(model="pagoda-test", input=QUESTION, temperature=0,
                                 max_output_tokens=150, **kwargs) as helper:
        snapshots = [e.snapshot for e in helper
                     if e.type == "response.function_call_arguments.delta"]
        assert helper.get_final_response().output[0].arguments == whole.arguments
    assert snapshots[-1] == whole.arguments


def test_auto_reads_hermes_calls(client):
    call = '{"name": "add", "arguments": {"a": 2, "b": 40}}'
    regex = r"Adding\.\n<tool_call>\n" + regex_literal(call) + r"\n</tool_call>"
    kwargs = dict(tools=TOOLS, extra_body={"guided_regex": regex})
    message, item = respond(client, **kwargs).output
    assert message.type == "message" and message.content[0].text == "Adding.\n"
    assert (item.name, json.loads(item.arguments)) == ("add", {"a": 2, "b": 40})
    events = list(respond(client, stream=True, **kwargs))
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    arguments = "".join(e.delta for e in events
                        if e.type == "response.function_call_arguments.delta")
    assert (text, arguments) == ("Adding.\n", '{"a": 2, "b": 40}')
    assert final.output[1].arguments == arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]


def test_second_turn_with_function_call_output(client):
    first = respond(client, tools=TOOLS, tool_choice=WEATHER_CHOICE)
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}
    # The whole conversation as input items, and the same continued from the stored first turn.
    explicit = respond(
        client, tools=TOOLS, tool_choice="none", max_output_tokens=8,
        input=[{"role": "user", "content": QUESTION}, call.model_dump(exclude_none=True),
               result],
    )
    continued = respond(client, tools=TOOLS, tool_choice="none", max_output_tokens=8,
                        input=[result], previous_response_id=first.id)
    assert explicit.output_text and explicit.output[0].type == "message"
    assert continued.output_text == explicit.output_text
    assert continued.usage.input_tokens == explicit.usage.input_tokens
    alone = respond(client, tools=TOOLS, tool_choice="none", max_output_tokens=1)
    assert explicit.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "name": 3}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "add"}]},
     "input[0].arguments"),
])
def test_refusals_name_the_field(tools_server, body, param):
    response = httpx.post(f"{tools_server.v1}/responses", json={"input": "x", **body},
                          headers=tools_server.headers, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_auto_needs_the_flag(openai_server):
    client = OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice") as caught:
        client.responses.create(model=openai_server.model, input="x", tools=TOOLS)
    assert caught.value.body["param"] == "tool_choice"
