"""Embeddings from the engine: a pooling request's vector equals pooling transformers' final
hidden states (after the final norm) in float32, for every family, under chunked prefill, with
prefix caching on, batched with generation requests; its KV blocks are freed after."""

from __future__ import annotations

import pytest
import torch
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
