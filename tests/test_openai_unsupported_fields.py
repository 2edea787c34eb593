"""Request fields Pagoda does not implement and that would change the answer are refused with a
400 naming them (never silently ignored); fields that change nothing are accepted. Over HTTP,
through the openai SDK as clients send them and through httpx for vLLM's extras."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from pagoda.adapters.openai.protocol import ChatCompletionRequest
from pagoda.adapters.openai.unsupported import REFUSED_FIELDS

MESSAGES = [{"role": "user", "content": "Hi"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def http(openai_server):
    with httpx.Client(base_url=openai_server.base_url, headers=openai_server.headers,
                      timeout=60) as client:
        yield client


def assert_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert error["message"].startswith(f"{field}: ")


@pytest.mark.parametrize(("field", "value"), [
    ("functions", [WEATHER_TOOL["function"]]),
    ("function_call", {"name": "get_weather"}),
    ("modalities", ["text", "audio"]),
    ("audio", {"voice": "alloy", "format": "wav"}),
])
def test_the_sdk_gets_a_400_naming_the_field(client, openai_server, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=openai_server.model, messages=MESSAGES,
                                       max_tokens=2, **{field: value})
    error = refused.value.body
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/chat/completions", "continue_final_message", True),
    ("/v1/chat/completions", "web_search_options", {"search_context_size": "low"}),
    ("/v1/completions", "suffix", " and so on"),
    ("/v1/completions", "tools", [WEATHER_TOOL]),
    ("/v1/completions", "allowed_token_ids", [5, 6]),
])
def test_vllm_extras_get_a_400_naming_the_field(http, path, field, value):
    body: dict[str, Any] = {"prompt": "Hi"} if path == "/v1/completions" else {
        "messages": MESSAGES}
    assert_refused(http.post(path, json={**body, "max_tokens": 2, field: value}), field)


@pytest.mark.parametrize(
    "field", sorted(set(REFUSED_FIELDS) - set(ChatCompletionRequest.model_fields))
)
def test_every_listed_field_is_refused_on_chat(http, field):
    # A non-empty object asks for something of every one of them.
    body = {"messages": MESSAGES, "max_tokens": 2, field: {"asks": "something"}}
    assert_refused(http.post("/v1/chat/completions", json=body), field)


@pytest.mark.parametrize("extra", [
    {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto"},
    {"tools": [], "tool_choice": "none", "parallel_tool_calls": False},
    {"function_call": "none", "functions": None},
    {"response_format": {"type": "text"}, "modalities": ["text"], "prompt_logprobs": None},
    {"prediction": {"type": "content", "content": "Hi"}, "echo": False},
])
def test_fields_that_change_nothing_are_accepted(http, extra):
    response = http.post("/v1/chat/completions",
                         json={"messages": MESSAGES, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text


def test_completions_still_serve_echo(http):
    response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "echo": True})
    assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith("Hi")
