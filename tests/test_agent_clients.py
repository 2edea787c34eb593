"""Tool calling and structured outputs as agent libraries drive them, unchanged: langchain-openai
(bind_tools with a forced tool_choice, with_structured_output by json_schema and by function
calling, streamed tool calls, an agent loop's second turn), LiteLLM (completion with tools and
with a response_format) and pydantic-ai (an Agent's typed output, as a tool call and as a
native JSON schema)."""

from __future__ import annotations

import json
import os
from typing import Literal

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class GetWeather(BaseModel):
    """Get the weather forecast for a city."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


class Add(BaseModel):
    """Add two small numbers."""

    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


TOOLS = {"GetWeather": GetWeather, "Add": Add}
QUESTION = [HumanMessage("What is the weather in Paris this week?")]


@pytest.fixture(scope="module", params=[None, 7], ids=["greedy", "seeded"])
def chat_model(request, tools_server) -> ChatOpenAI:
    sampling = dict(temperature=0) if request.param is None else dict(temperature=1.0,
                                                                       seed=request.param)
    return ChatOpenAI(
        model=tools_server.model, base_url=tools_server.v1, api_key=tools_server.api_key,
        max_completion_tokens=150, max_retries=0, **sampling,
    )


def assert_valid(tool_call: dict) -> None:
    TOOLS[tool_call["name"]].model_validate(tool_call["args"])
    assert tool_call["id"].startswith("call_")


def test_bind_tools_forced(chat_model):
    for tool_choice in ("GetWeather", {"type": "function", "function": {"name": "Add"}}):
        message = chat_model.bind_tools([GetWeather, Add], tool_choice=tool_choice).invoke(QUESTION)
        (tool_call,) = message.tool_calls
        expected = tool_choice if isinstance(tool_choice, str) else "Add"
        assert tool_call["name"] == expected
        assert_valid(tool_call)
        assert message.response_metadata["finish_reason"] == "tool_calls"
    # "any" is langchain's "required"; one call, as parallel_tool_calls=False asks.
    bound = chat_model.bind_tools([GetWeather, Add], tool_choice="any", parallel_tool_calls=False)
    (tool_call,) = bound.invoke(QUESTION).tool_calls
    assert_valid(tool_call)


def test_streamed_tool_calls(chat_model):
    bound = chat_model.bind_tools([GetWeather, Add], tool_choice="GetWeather")
    chunks = list(bound.stream(QUESTION))
    assert len(chunks) > 2
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert isinstance(merged, AIMessageChunk)
    (tool_call,) = merged.tool_calls
    assert tool_call["name"] == "GetWeather"
    assert_valid(tool_call)
    # Greedy, or seeded: the same call as the whole answer.
    assert tool_call["args"] == bound.invoke(QUESTION).tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(chat_model, method):
    structured = chat_model.with_structured_output(GetWeather, method=method)
    assert isinstance(structured.invoke(QUESTION), GetWeather)


def test_agent_loop_second_turn(chat_model):
    bound = chat_model.bind_tools([GetWeather, Add], tool_choice="GetWeather")
    first = bound.invoke(QUESTION)
    result = ToolMessage("Sunny, 24 C", tool_call_id=first.tool_calls[0]["id"])
    second = chat_model.bind_tools([GetWeather, Add], tool_choice="none").invoke(
        [*QUESTION, first, result]
    )
    assert isinstance(second.content, str) and second.content
    assert not second.tool_calls


@pytest.fixture(scope="module")
def litellm():
    # LiteLLM fetches a model price list on import unless told to use its bundled copy.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    return litellm


def test_litellm_tools_and_response_format(litellm, tools_server):
    common = dict(model=f"openai/{tools_server.model}", api_base=tools_server.v1,
                  api_key=tools_server.api_key, temperature=0, max_tokens=150)
    tools = [{"type": "function", "function": {"name": name, "description": model.__doc__,
                                               "parameters": model.model_json_schema()}}
             for name, model in TOOLS.items()]
    response = litellm.completion(
        messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, **common,
    )
    (call,) = response.choices[0].message.tool_calls
    GetWeather.model_validate_json(call.function.arguments)
    response = litellm.completion(
        messages=[{"role": "user", "content": "Weather in Paris?"}], response_format=GetWeather,
        **common,
    )
    GetWeather.model_validate(json.loads(response.choices[0].message.content))


@pytest.mark.parametrize("native", [False, True], ids=["tool_output", "native_output"])
def test_pydantic_ai_agent_output(tools_server, native):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=tools_server.v1, api_key=tools_server.api_key)
    model = OpenAIChatModel(tools_server.model, provider=provider)
    # Its output tool is called with tool_choice "required"; one call is enough.
    settings = {"temperature": 0, "max_tokens": 150, "parallel_tool_calls": False}
    output_type = NativeOutput(GetWeather) if native else GetWeather
    agent = Agent(model, output_type=output_type, model_settings=settings, retries=0)
    assert isinstance(agent.run_sync("What is the weather in Paris?").output, GetWeather)
