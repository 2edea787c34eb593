"""The dense families beyond Llama's (Qwen3, Phi-3 with and without LongRoPE, GPT-NeoX, StableLM,
OPT), each in the variants that tell it apart: greedy outputs token-exact with transformers'
`generate` in float32 and cumulative logprobs within 1e-3 of its scores, with prompts fed in
chunks and requests preempted; the Triton attention path under the interpreter; LongRoPE's
switch to its long factors (recompute, prefix cache) as transformers' Phi-3 makes it."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import pytest
import torch
import triton_devices
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.attention import ATTENTION_BACKEND_ENV

VARIANTS = ("llama-attention-bias", "qwen3", "qwen3-window", "phi3", "phi3-longrope", "gpt-neox",
            "gpt-neox-sequential", "stablelm", "stablelm-parallel", "opt", "opt-post-norm")
# One variant per family for the (interpreted, slow) Triton path.
TRITON_VARIANTS = ("qwen3", "phi3-longrope", "gpt-neox", "stablelm", "opt")
# Straddling block boundaries (16) and phi3-longrope's switch at 32 tokens, which the shorter
# prompts cross while they generate.
PROMPT_LENGTHS = (1, 5, 16, 17, 33, 60)
MAX_TOKENS = 24


@cache
def _hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(vocab_size: int, lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(4321)
    return [[1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()
            for length in lengths]


def _hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """transformers' greedy tokens (EOS ignored) and their cumulative logprob, from the logits
    `generate` itself computed (Phi-3's recompute past its LongRoPE switch included)."""
    with torch.no_grad():
        out = _hf_model(path).generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item()
                for step, token in zip(out.logits, tokens)]
    return tokens, sum(logprobs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_and_logprobs_match_transformers_in_chunks_and_under_preemption(
    checkpoint, variant
):
    path = checkpoint(variant)
    # 10 blocks of 16 slots for six requests of up to 84 tokens: some are preempted and
    # recomputed; a 16-token budget splits every longer prompt into chunks.
    llm = LLM(path, num_kv_blocks=10, max_num_batched_tokens=16)
    prompts = _prompts(llm.engine.hf_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        tokens, cumulative_logprob = _hf_greedy(path, prompt, MAX_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == tokens, f"prompt length {len(prompt)}"
        assert completion.cumulative_logprob == pytest.approx(cumulative_logprob, abs=1e-3)
    llm.engine.check_no_leaks()


@pytest.fixture(params=triton_devices.DEVICES)
def triton_device(request) -> torch.device:
    return triton_devices.require(request.param)


@pytest.mark.parametrize("variant", TRITON_VARIANTS)
def test_triton_attention_path_matches_transformers(checkpoint, variant, triton_device,
                                                    monkeypatch):
    """A 40-token prompt (past phi3-longrope's switch) in two chunks, then decodes."""
    triton_backend = pytest.importorskip("pagoda.backend.attention.triton_backend")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    path = checkpoint(variant)
    llm = LLM(path, device=triton_device.type, dtype="float32", num_kv_blocks=8,
              max_num_batched_tokens=32)
    assert isinstance(llm.engine.model.attention_backend, triton_backend.TritonAttentionBackend)
    (prompt,) = _prompts(llm.engine.hf_config.vocab_size, lengths=(40,))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    assert output.outputs[0].token_ids == _hf_greedy(path, prompt, 4)[0]
    llm.engine.check_no_leaks()


def test_longrope_sequences_growing_past_the_switch_are_recomputed(checkpoint, caplog):
    """Prompts below phi3-longrope's 32 tokens that generate past it are recomputed with the
    long factors (as transformers drops its cache there), one that starts above it is not."""
    path = checkpoint("phi3-longrope")
    llm = LLM(path, num_kv_blocks=32)
    prompts = _prompts(llm.engine.hf_config.vocab_size, lengths=(10, 20, 40))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="pagoda.backend.scheduler"):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    recomputed = {record.args[0] for record in caplog.records if "grew past" in record.msg}
    assert recomputed == {"0", "1"}  # request ids in prompt order; 10 + 24 and 20 + 24 > 32
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _hf_greedy(path, prompt, MAX_TOKENS)[0]
    llm.engine.check_no_leaks()


def test_longrope_beam_search_through_the_switch_matches_transformers(checkpoint):
    """Beams recomputed together when they grow past the switch, as transformers' beams are."""
    path = checkpoint("phi3-longrope")
    llm = LLM(path, num_kv_blocks=40, max_num_batched_tokens=16)
    (prompt,) = _prompts(llm.engine.hf_config.vocab_size, lengths=(28,))
    params = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=12,
                            ignore_eos=True)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    with torch.no_grad():
        reference = _hf_model(path).generate(
            torch.tensor([prompt]), num_beams=2, num_return_sequences=2, do_sample=False,
            max_new_tokens=12, min_new_tokens=12, early_stopping=True,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    assert [c.token_ids for c in output.outputs] == [r[len(prompt):].tolist() for r in reference]
    llm.engine.check_no_leaks()


def test_longrope_prefix_cache_keeps_short_and_long_sequences_apart(checkpoint):
    """A cached block computed for a short sequence holds other keys than the same tokens in a
    long one: a long prompt must not reuse it, a short one may."""
    path = checkpoint("phi3-longrope")
    llm = LLM(path, num_kv_blocks=32, enable_prefix_caching=True)
    (short, tail) = _prompts(llm.engine.hf_config.vocab_size, lengths=(20, 30))
    long_prompt = short[:16] + tail[1:]  # 45 tokens sharing the short prompt's first block
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    blocks = llm.engine.block_manager

    llm.generate([short], params, use_tqdm=False)
    hits = blocks.prefix_cache_hits
    (output,) = llm.generate([long_prompt], params, use_tqdm=False)
    assert blocks.prefix_cache_hits == hits
    assert output.outputs[0].token_ids == _hf_greedy(path, long_prompt, 4)[0]

    llm.generate([short[:16] + tail[1:5]], params, use_tqdm=False)
    assert blocks.prefix_cache_hits == hits + 1
    llm.engine.check_no_leaks()


def test_qwen3_sliding_window_layers_are_refused_by_name():
    from transformers import Qwen3Config

    from pagoda.backend.attention import TorchAttentionBackend
    from pagoda.backend.models import ModelContext, build_model

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=16, max_window_layers=1,
                         architectures=["Qwen3ForCausalLM"])
    with pytest.raises(ValueError, match=r"layer_types makes only layers \[1, 2\] sliding"):
        build_model(ModelContext(config, TorchAttentionBackend(), 64))
