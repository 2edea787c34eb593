"""Greedy outputs token-exact with transformers `generate` (float32), and logprobs close to its
log_softmax, across architectures and under every scheduling regime the engine has."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, LLMEngine, SamplingParams
from pagoda.backend.config import EngineConfig

MAX_TOKENS = 24
# Prompt lengths straddling block boundaries (block size 16) and the Mistral variant's window.
PROMPT_LENGTHS = (1, 5, 16, 17, 33, 60)
VARIANTS = ("llama-gqa", "llama-mha-tied", "llama-sharded", "llama3-rope", "mistral-window", "qwen2")


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [
        [1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()
        for length in lengths
    ]


@cache
def _hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int = MAX_TOKENS) -> list[int]:
    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def greedy(**overrides) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, **overrides)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers_submitted_together(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=128, max_num_batched_tokens=512)
    prompts = make_prompts(llm.engine.hf_config.vocab_size)
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == hf_greedy(path, prompt), f"prompt length {len(prompt)}"
    llm.engine.check_no_leaks()


def test_chunked_prefill_under_small_token_budget(checkpoint):
    path = checkpoint("llama-gqa")
    llm = LLM(path, num_kv_blocks=128, max_num_batched_tokens=16, max_num_seqs=4)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, lengths=(50, 7, 33, 90, 3))
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(path, prompt)
    llm.engine.check_no_leaks()


def test_requests_joining_while_others_decode(checkpoint):
    path = checkpoint("qwen2")
    engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128, max_num_batched_tokens=64))
    prompts = make_prompts(engine.hf_config.vocab_size, lengths=(12, 40, 7, 70, 25, 3))
    finished: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, greedy())
        for _ in range(3):  # let earlier requests get into their decode phase
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    for index, prompt in enumerate(prompts):
        assert finished[str(index)] == hf_greedy(path, prompt)
    engine.check_no_leaks()


def test_preemption_resumes_with_identical_output(checkpoint):
    path = checkpoint("mistral-window")
    # 8 blocks of 16 = 128 token slots for five requests of up to 96 tokens each.
    llm = LLM(path, num_kv_blocks=8, max_num_batched_tokens=64)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, lengths=(30, 45, 20, 60, 38))
    params = SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        reference = hf_greedy_ignore_eos(path, prompt, 36)
        assert output.outputs[0].token_ids == reference
    llm.engine.check_no_leaks()


def hf_greedy_ignore_eos(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = _hf_model(path)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ("llama-gqa", "qwen2"))
def test_logprobs_match_transformers_log_softmax(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=32)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, lengths=(9, 40))
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=16, logprobs=3, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    model = _hf_model(path)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        full = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logits = model(full).logits[0, len(prompt) - 1 : -1].float()
        reference = torch.log_softmax(logits, dim=-1)
        total = 0.0
        for step, (token_id, step_logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
            chosen = step_logprobs[token_id]
            assert abs(chosen.logprob - reference[step, token_id].item()) < 1e-4
            # Exact up to near-ties: tokens within float noise of the chosen one may rank either
            # side of it in the two implementations.
            chosen_reference = reference[step, token_id]
            surely_above = int((reference[step] > chosen_reference + 1e-4).sum())
            maybe_above = int((reference[step] > chosen_reference - 1e-4).sum()) - 1
            assert surely_above + 1 <= chosen.rank <= maybe_above + 1
            top = sorted(step_logprobs.items(), key=lambda kv: -kv[1].logprob)[:3]
            expected_top = torch.topk(reference[step], 3).indices.tolist()
            assert {token for token, _ in top} <= set(expected_top) | {token_id}
            total += chosen.logprob
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-4)
    llm.engine.check_no_leaks()
