"""The OpenAI-compatible server through the official openai SDK, as users' code calls it."""

from __future__ import annotations

import math

import httpx
import pytest
from openai import OpenAI

from pagoda.backend import LLM, SamplingParams

CHAT = [{"role": "user", "content": "Tell me about paging."}]


@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)


def greedy_chat(client: OpenAI, model: str, max_tokens: int = 16, **kwargs):
    return client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=max_tokens, temperature=0, **kwargs
    )


def test_models_list(client, openai_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [openai_server.model]
    assert models.data[0].object == "model"
    assert client.models.retrieve(openai_server.model).id == openai_server.model


def test_chat_non_streaming(client, openai_server):
    response = greedy_chat(
        client, openai_server.model, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.model == openai_server.model
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    usage = response.usage
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streaming_with_usage_matches_non_streaming(client, openai_server):
    expected = greedy_chat(client, openai_server.model)
    chunks = list(greedy_chat(
        client, openai_server.model, stream=True, stream_options={"include_usage": True}
    ))
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert content_chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == expected.choices[0].message.content
    assert usage_chunk.choices == []
    assert usage_chunk.usage == expected.usage


def test_completions_two_prompts_n2_are_prompt_major(client, openai_server):
    prompts = ["The quick brown fox", "Once upon a time"]
    singles = [
        client.completions.create(model=openai_server.model, prompt=p, max_tokens=6, temperature=0)
        for p in prompts
    ]
    response = client.completions.create(
        model=openai_server.model, prompt=prompts, max_tokens=6, temperature=0, n=2
    )
    assert response.object == "text_completion"
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    texts = [c.text for c in response.choices]
    assert texts == [singles[0].choices[0].text] * 2 + [singles[1].choices[0].text] * 2
    assert response.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert response.usage.completion_tokens == sum(2 * s.usage.completion_tokens for s in singles)


def test_completions_token_id_prompts(client, openai_server):
    by_text = client.completions.create(
        model=openai_server.model, prompt="Once upon a time", max_tokens=5, temperature=0
    )
    ids = httpx.post(
        f"{openai_server.base_url}/tokenize", headers=openai_server.headers,
        json={"prompt": "Once upon a time"},
    ).json()["tokens"]
    response = client.completions.create(
        model=openai_server.model, prompt=[ids, ids], max_tokens=5, temperature=0
    )
    assert [c.text for c in response.choices] == [by_text.choices[0].text] * 2


def test_chat_logprobs(client, openai_server):
    response = greedy_chat(client, openai_server.model, max_tokens=6, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        top = [t.logprob for t in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, top[0], rel_tol=1e-6)
        if "\ufffd" not in entry.token:  # a whole character: bytes are its UTF-8
            assert bytes(entry.bytes).decode() == entry.token
    streamed = greedy_chat(
        client, openai_server.model, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
    )
    streamed_content = [e for c in streamed if c.choices[0].logprobs
                        for e in c.choices[0].logprobs.content]
    assert streamed_content == content


def test_completion_logprobs(client, openai_server):
    response = client.completions.create(
        model=openai_server.model, prompt="Once upon a time", max_tokens=6, temperature=0,
        logprobs=2,
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == 6
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 2 <= len(top) <= 3
        assert top[token] == logprob == max(top.values())
    streamed = client.completions.create(
        model=openai_server.model, prompt="Once upon a time", max_tokens=6, temperature=0,
        logprobs=2, stream=True,
    )
    pieces = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == logprobs.tokens
    assert [o for p in pieces for o in p.text_offset] == logprobs.text_offset


def test_stop_string(client, openai_server):
    full = greedy_chat(client, openai_server.model, max_tokens=16, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    stopped = greedy_chat(client, openai_server.model, max_tokens=16, stop=[stop])
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    streamed = greedy_chat(client, openai_server.model, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_seed_reproducibility(client, openai_server):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=openai_server.model, messages=CHAT, max_tokens=12, temperature=1.0, seed=seed
        )
        return response.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_beam_search_through_extra_body(client, openai_server, demo_model_dir):
    prompt = "Once upon a time"
    response = client.completions.create(
        model=openai_server.model, prompt=prompt, max_tokens=8, n=2,
        extra_body={"use_beam_search": True, "ignore_eos": True},
    )
    llm = LLM(str(demo_model_dir), dtype="float32", num_kv_blocks=64)
    (offline,) = llm.generate(
        [prompt], SamplingParams(use_beam_search=True, n=2, temperature=0, max_tokens=8,
                                 ignore_eos=True),
        use_tqdm=False,
    )
    assert [c.text for c in response.choices] == [c.text for c in offline.outputs]
    streamed = list(client.completions.create(
        model=openai_server.model, prompt=prompt, max_tokens=8, n=2, stream=True,
        extra_body={"use_beam_search": True, "ignore_eos": True},
    ))
    # Beams are only known at the end: each choice arrives in one piece.
    assert sorted((c.choices[0].index, c.choices[0].text) for c in streamed) == [
        (i, c.text) for i, c in enumerate(offline.outputs)
    ]
