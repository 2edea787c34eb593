"""Embeddings from the engine: a pooling request's vector equals pooling transformers' final
hidden states (after the final norm) in float32, for every family, under chunked prefill, with
prefix caching on, batched with generation requests; its KV blocks are freed after."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from openai import NOT_GIVEN
from test_parity import VARIANTS, _hf_model, make_prompts

from pagoda.backend import LLM, PoolingParams, SamplingParams
from pagoda.backend.errors import InvalidParameter

PROMPT_LENGTHS = (1, 5, 16, 17, 40)


def reference_embedding(path, prompt: list[int], pooling: str, normalize: bool = True):
    model = _hf_model(path)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
    final = out.hidden_states[-1][0].float()
    # The last hidden state is the final norm's output: the one the LM head reads.
    torch.testing.assert_close(model.lm_head(final), out.logits[0].float(), atol=1e-4, rtol=1e-4)
    vector = final[-1] if pooling == "last" else final.mean(dim=0)
    return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


@pytest.mark.parametrize("variant", VARIANTS)
def test_embeddings_match_transformers_hidden_states(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=16, enable_prefix_caching=True)
    engine = llm.engine
    prompts = make_prompts(engine.hf_config.vocab_size, PROMPT_LENGTHS)
    # Generation requests first: their prompt blocks are cached when the pooling requests come,
    # and mean pooling must not take them from the cache.
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    for pooling in ("last", "mean"):
        outputs = llm.embed(prompts, PoolingParams(pooling_type=pooling), use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            expected = reference_embedding(path, prompt, pooling)
            torch.testing.assert_close(torch.tensor(output.embedding), expected,
                                       atol=1e-4, rtol=1e-4)
            assert output.outputs[0].token_ids == []
    engine.check_no_leaks()


def test_pooling_batched_with_generation_and_preempted(checkpoint):
    path = checkpoint("qwen2")
    # 8 blocks of 16: the generating requests fill the pool and push the others out.
    llm = LLM(path, num_kv_blocks=8, max_num_batched_tokens=24, pooling="mean")
    engine = llm.engine
    prompts = make_prompts(engine.hf_config.vocab_size, (30, 45, 20, 60, 38))
    generate = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"gen-{index}", prompt, generate)
        engine.add_request(f"embed-{index}", prompt, PoolingParams(normalize=False))
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert engine.scheduler.num_preemptions > 0
    for index, prompt in enumerate(prompts):
        expected = reference_embedding(path, prompt, "mean", normalize=False)
        torch.testing.assert_close(
            torch.tensor(finished[f"embed-{index}"].embedding), expected, atol=1e-4, rtol=1e-4
        )
        assert len(finished[f"gen-{index}"].outputs[0].token_ids) == 30
    engine.check_no_leaks()


def test_unknown_pooling_type_is_refused(demo_model_dir):
    with pytest.raises(InvalidParameter) as caught:
        PoolingParams(pooling_type="cls")
    assert caught.value.field == "pooling_type"
    with pytest.raises(ValueError, match="pooling"):
        LLM(str(demo_model_dir), pooling="max")


# -- through the OpenAI-compatible server -----------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(openai_server):
    from openai import OpenAI

    return OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def offline(demo_model_dir) -> LLM:
    """The server's model offline, for the vectors it should return."""
    return LLM(str(demo_model_dir), num_kv_blocks=64)


def test_openai_sdk_embeddings(openai_client, openai_server, offline):
    texts = ["The quick brown fox", "jumps over the lazy dog", "paging"]
    expected = offline.embed(texts, use_tqdm=False)
    # Unless told otherwise the SDK asks for base64 and decodes it; told "base64", it returns
    # the string as it came.
    for encoding_format in (NOT_GIVEN, "float", "base64"):
        response = openai_client.embeddings.create(
            model=openai_server.model, input=texts, encoding_format=encoding_format
        )
        assert [item.index for item in response.data] == [0, 1, 2]
        for item, output in zip(response.data, expected):
            assert item.object == "embedding"
            vector = item.embedding
            if encoding_format == "base64":
                vector = np.frombuffer(base64.b64decode(vector), dtype="<f4").tolist()
            torch.testing.assert_close(torch.tensor(vector), torch.tensor(output.embedding),
                                       atol=1e-5, rtol=1e-5)
            assert torch.tensor(vector).norm().item() == pytest.approx(1.0, abs=1e-5)
        num_tokens = sum(len(output.prompt_token_ids) for output in expected)
        assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens
    ids = offline.get_tokenizer().encode("paging")
    by_ids = openai_client.embeddings.create(model=openai_server.model, input=[ids, ids[:2]])
    assert len(by_ids.data) == 2
    single = openai_client.embeddings.create(model=openai_server.model, input=ids)
    assert single.data[0].embedding == pytest.approx(by_ids.data[0].embedding, abs=1e-5)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": []}, "input"),
    ({"input": [[1, 10**9]]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "word " * 600}, "input"),
])
def test_embedding_errors_name_the_field(openai_server, body, param):
    import httpx

    response = httpx.post(f"{openai_server.v1}/embeddings", json=body,
                          headers=openai_server.headers, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_langchain_openai_embeddings(openai_server, offline):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: no tiktoken download, the texts are sent as they are.
    embeddings = OpenAIEmbeddings(
        model=openai_server.model, base_url=openai_server.v1, api_key=openai_server.api_key,
        check_embedding_ctx_length=False, max_retries=0,
    )
    texts = ["LangChain sends lists of texts", "and single queries"]
    vectors = embeddings.embed_documents(texts)
    expected = offline.embed(texts, use_tqdm=False)
    for vector, output in zip(vectors, expected):
        assert vector == pytest.approx(output.embedding, abs=1e-5)
    assert embeddings.embed_query(texts[1]) == pytest.approx(expected[1].embedding, abs=1e-5)
