"""Prompt logprobs through the OpenAI-compatible server, with the openai SDK: completions' echo
with logprobs (what lm-evaluation-harness sends), max_tokens=0, streaming, and vLLM's
prompt_logprobs and chat echo extras. Values are checked against transformers in float32."""

from __future__ import annotations

from functools import cache

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

PROMPT_IDS = [1, 450, 4996, 17354, 1701, 432, 8814, 975, 278, 17366, 11203, 29889]


@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)


@cache
def _reference(model_dir: str, prompt: tuple[int, ...]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def prompt_ids(openai_server, demo_model_dir) -> list[int]:
    vocab_size = AutoModelForCausalLM.from_pretrained(demo_model_dir).config.vocab_size
    return [token_id % vocab_size for token_id in PROMPT_IDS]


def reference(demo_model_dir, prompt_ids: list[int]) -> torch.Tensor:
    """Row i: log_softmax of the logits that score prompt token i + 1."""
    return _reference(str(demo_model_dir), tuple(prompt_ids))


def echo(client: OpenAI, model: str, prompt, **kwargs):
    return client.completions.create(
        model=model, prompt=prompt, echo=True, logprobs=1, temperature=0, **kwargs
    )


def test_echo_with_logprobs_scores_the_prompt(client, openai_server, demo_model_dir, prompt_ids):
    response = echo(client, openai_server.model, prompt_ids, max_tokens=1)
    (choice,) = response.choices
    logprobs = choice.logprobs
    num_prompt = len(prompt_ids)
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == num_prompt + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(demo_model_dir, prompt_ids)
    for position in range(1, num_prompt):
        value = logprobs.token_logprobs[position]
        assert value == pytest.approx(expected[position - 1, prompt_ids[position]].item(), abs=1e-4)
        top = logprobs.top_logprobs[position]
        # logprobs=1: the most likely token, and the prompt token when it is another one.
        assert 1 <= len(top) <= 2
        assert max(top.values()) == pytest.approx(expected[position - 1].max().item(), abs=1e-4)
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert choice.text.startswith(client_decode(openai_server, prompt_ids))
    assert response.usage.prompt_tokens == num_prompt and response.usage.completion_tokens == 1


def client_decode(openai_server, prompt_ids: list[int]) -> str:
    response = httpx.post(f"{openai_server.base_url}/detokenize", headers=openai_server.headers,
                          json={"tokens": prompt_ids})
    return response.json()["prompt"]


def test_echo_with_max_tokens_zero_returns_the_prompt_alone(client, openai_server, prompt_ids):
    prompt = "The quick brown fox jumps over the lazy dog"
    response = echo(client, openai_server.model, [prompt, prompt], max_tokens=0)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert all(choice.text == prompt for choice in response.choices)
    assert all(choice.finish_reason == "length" for choice in response.choices)
    assert response.usage.completion_tokens == 0
    (ids_choice,) = echo(client, openai_server.model, prompt_ids, max_tokens=0).choices
    assert ids_choice.logprobs.token_logprobs[0] is None
    assert len(ids_choice.logprobs.tokens) == len(prompt_ids)
    plain = client.completions.create(
        model=openai_server.model, prompt=prompt, echo=True, max_tokens=0
    )
    assert plain.choices[0].text == prompt and plain.choices[0].logprobs is None


def test_streamed_echo_logprobs_add_up_to_the_whole_answer(client, openai_server, prompt_ids):
    whole = echo(client, openai_server.model, prompt_ids, max_tokens=6).choices[0]
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    offsets: list[int] = []
    text = ""
    for chunk in echo(client, openai_server.model, prompt_ids, max_tokens=6, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_vllm_prompt_logprobs_field(client, openai_server, demo_model_dir, prompt_ids):
    response = client.completions.create(
        model=openai_server.model, prompt=prompt_ids, max_tokens=2, temperature=0,
        extra_body={"prompt_logprobs": 2},
    )
    (choice,) = response.choices
    entries = choice.model_extra["prompt_logprobs"]
    assert choice.logprobs is None
    assert len(entries) == len(prompt_ids) and entries[0] is None
    expected = reference(demo_model_dir, prompt_ids)
    for position in range(1, len(prompt_ids)):
        entry = entries[position]
        chosen = entry[str(prompt_ids[position])]
        assert chosen["logprob"] == pytest.approx(
            expected[position - 1, prompt_ids[position]].item(), abs=1e-4
        )
        assert chosen["rank"] >= 1 and isinstance(chosen["decoded_token"], str)
        assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2] or chosen["rank"] <= 2


def test_chat_prompt_logprobs_and_echo(client, openai_server):
    messages = [{"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Once upon a"}]
    response = client.chat.completions.create(
        model=openai_server.model, messages=messages, max_tokens=4, temperature=0,
        extra_body={"prompt_logprobs": 0, "echo": True, "add_generation_prompt": False},
    )
    entries = response.model_extra["prompt_logprobs"]
    assert len(entries) == response.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 for entry in entries[1:])  # prompt_logprobs=0: the token alone
    assert response.choices[0].message.content.startswith("Once upon a")
    plain = client.chat.completions.create(
        model=openai_server.model, messages=messages[:1], max_tokens=4, temperature=0,
        extra_body={"echo": True},
    )
    # The reply is the assistant's; the last message is the user's: nothing to continue.
    assert not plain.choices[0].message.content.startswith("Hello!")
    assert plain.model_extra.get("prompt_logprobs") is None
