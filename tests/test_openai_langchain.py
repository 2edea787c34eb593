"""The OpenAI-compatible server behind langchain-openai's ChatOpenAI and OpenAI LLM classes."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAI

MESSAGES = [SystemMessage("You are terse."), HumanMessage("What is a KV cache?")]


@pytest.fixture(scope="module")
def chat_model(openai_server) -> ChatOpenAI:
    return ChatOpenAI(
        model=openai_server.model, base_url=openai_server.v1, api_key=openai_server.api_key,
        temperature=0, max_completion_tokens=12, max_retries=0,
    )


def test_chat_invoke(chat_model):
    message = chat_model.invoke(MESSAGES)
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    usage = message.usage_metadata
    assert usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_chat_stream_matches_invoke(chat_model):
    expected = chat_model.invoke(MESSAGES).content
    chunks = list(chat_model.stream(MESSAGES))
    assert len(chunks) > 2
    assert "".join(chunk.content for chunk in chunks) == expected


def test_chat_batch(chat_model):
    conversations = [[HumanMessage(text)] for text in ("Hi", "Hello there", "Good morning")]
    results = chat_model.batch(conversations)
    assert [r.content for r in results] == [chat_model.invoke(c).content for c in conversations]


def test_llm_batch_of_prompts(openai_server):
    llm = OpenAI(
        model=openai_server.model, base_url=openai_server.v1, api_key=openai_server.api_key,
        temperature=0, max_tokens=8, n=2, max_retries=0,
    )
    prompts = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]
    result = llm.generate(prompts)
    assert len(result.generations) == len(prompts)
    for prompt, generations in zip(prompts, result.generations):
        # Greedy: both samples of a prompt equal that prompt's own completion.
        alone = llm.invoke(prompt)
        assert [g.text for g in generations] == [alone, alone]
    assert result.llm_output["token_usage"]["completion_tokens"] > 0
