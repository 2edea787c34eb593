"""Gemma 2, Gemma 3, StarCoder2 and GPT-BigCode against transformers (float32): greedy tokens
exact and cumulative logprobs within 1e-3, with prompts longer than every sliding window, chunked
prefill (a 16-token budget) and preemption (8 KV blocks) on; then the same tokens through the
Triton attention backend (Triton's interpreter on CPU).

What each variant exercises (tests/checkpoints.py): Gemma 2 alternates 12-token windows with
global layers and soft-caps attention scores and final logits; Gemma 3 has q/k norms, local
layers with their own rope theta and a linearly scaled global rope; StarCoder2 a 12-token window
on every layer, LayerNorm and biases; GPT-BigCode multi-query attention (one KV head) and learned
positions, and per-head fused q/k/v without multi-query. Configurations these implementations
do not cover are refused, naming the field.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTBigCodeConfig,
    Starcoder2Config,
)

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.attention import ATTENTION_BACKEND_ENV, TorchAttentionBackend
from pagoda.backend.models import ModelContext, build_model

VARIANTS = ("gemma2", "gemma3", "starcoder2", "gpt-bigcode", "gpt-bigcode-mha")
# Each longer than the 10- and 12-token windows; together more than 8 blocks of 16 can hold.
PROMPT_LENGTHS = (30, 45, 20, 60, 38)
MAX_TOKENS = 24


def make_prompts(vocab_size: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(4321)
    return [
        [1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()
        for length in lengths
    ]


@cache
def _hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = _hf_model(path).generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def hf_logprobs(path: Path, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """transformers' log-probability of each completion token given everything before it."""
    with torch.no_grad():
        logits = _hf_model(path)(torch.tensor([prompt + completion])).logits[0].float()
    log_probs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return log_probs[torch.arange(len(completion)), torch.tensor(completion)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_logprobs_match_transformers_under_chunking_and_preemption(
    checkpoint, variant
):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=8, max_num_batched_tokens=16)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, PROMPT_LENGTHS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        assert completion.token_ids == hf_greedy(path, prompt, MAX_TOKENS), len(prompt)
        expected = hf_logprobs(path, prompt, completion.token_ids)
        chosen = [step[token].logprob for token, step in zip(completion.token_ids,
                                                               completion.logprobs)]
        torch.testing.assert_close(torch.tensor(chosen), expected, atol=1e-4, rtol=0)
        assert completion.cumulative_logprob == pytest.approx(expected.sum().item(), abs=1e-3)
    llm.engine.check_no_leaks()


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_attention_gives_the_transformers_tokens(checkpoint, variant, monkeypatch):
    """Prefill chunks over a cached context, decodes batched with them, both past the window."""
    pytest.importorskip("pagoda.kernels.triton")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=32, max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, (33, 21))
    max_tokens = 8
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, max_tokens), len(prompt)
    llm.engine.check_no_leaks()



def test_triton_static_decode_buffers_with_per_layer_windows_and_soft_caps(
    checkpoint, monkeypatch
):
    """Decode steps through the static buffers a CUDA graph replays (prepare_decode: metadata
    from tensors only), run eagerly: Gemma 2's windowed and global layers, soft-capped, still
    give transformers' tokens."""
    pytest.importorskip("pagoda.kernels.triton")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    path = checkpoint("gemma2")
    llm = LLM(path, num_kv_blocks=32, max_model_len=256, static_decode_buffers=True,
              cuda_graph_sizes=[1, 2, 4], enable_prefix_caching=False)
    assert llm.engine.runner.graph_runner is not None
    prompts = make_prompts(llm.engine.hf_config.vocab_size, (27, 14, 40))
    max_tokens = 8
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt, max_tokens), len(prompt)
    llm.engine.check_no_leaks()

@pytest.mark.parametrize(
    ("config", "message"),
    [
        (Gemma3TextConfig(num_hidden_layers=2, head_dim=16, use_bidirectional_attention=True,
                          architectures=["Gemma3ForCausalLM"]),
         "gemma3_text: use_bidirectional_attention=True"),
        (Gemma2Config(num_hidden_layers=2, head_dim=16, architectures=["Gemma2ForCausalLM"],
                      layer_types=["chunked_attention", "full_attention"]),
         r"gemma2: layer_types \['chunked_attention'\] are not supported"),
        (GPTBigCodeConfig(n_layer=1, multi_query=False, add_cross_attention=True,
                          architectures=["GPTBigCodeForCausalLM"]),
         "gpt_bigcode: add_cross_attention=True"),
        (Starcoder2Config(num_hidden_layers=1, hidden_act="swiglu",
                          architectures=["Starcoder2ForCausalLM"]),
         "hidden_act 'swiglu' is not supported"),
    ],
    ids=["bidirectional", "layer-type", "cross-attention", "activation"],
)
def test_unsupported_configurations_are_refused_naming_the_field(config, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        build_model(ModelContext(config, TorchAttentionBackend(), max_positions=64))
