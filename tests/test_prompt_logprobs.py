"""Prompt logprobs (vLLM's prompt_logprobs; completions' echo with logprobs) against
transformers' log_softmax in float32, for every family, under chunked prefill with prefix
caching on; and how they reach RequestOutputs of each output kind."""

from __future__ import annotations

import pytest
import torch
from test_parity import VARIANTS, _hf_model, make_prompts

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.errors import InvalidParameter
from pagoda.backend.sampling_params import RequestOutputKind

TOP = 3
# Lengths around the block size (16) and the token budget (16): chunk boundaries fall inside,
# at the end of and right after a block.
PROMPT_LENGTHS = (1, 2, 16, 17, 40)


def reference_logprobs(path, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i scores prompt[i + 1]."""
    with torch.no_grad():
        logits = _hf_model(path)(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def check_against_reference(entries, prompt: list[int], reference: torch.Tensor) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for position in range(1, len(prompt)):
        entry, row, token_id = entries[position], reference[position - 1], prompt[position]
        chosen = entry[token_id]
        assert chosen.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
        # Exact up to near-ties: tokens within float noise of the prompt token may rank either
        # side of it in the two implementations.
        surely_above = int((row > row[token_id] + 1e-4).sum())
        maybe_above = int((row > row[token_id] - 1e-4).sum()) - 1
        assert surely_above + 1 <= chosen.rank <= maybe_above + 1
        top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank <= TOP)
        expected_values, expected_ids = torch.topk(row, TOP)
        assert [value for _, _, value in top] == pytest.approx(expected_values.tolist(), abs=1e-4)
        assert len(entry) <= TOP + 1  # the top k, and the prompt token when it is not among them
        assert {tid for _, tid, _ in top} <= set(expected_ids.tolist()) | {token_id}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logprobs_match_transformers_chunked_with_prefix_cache(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=16, enable_prefix_caching=True)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, PROMPT_LENGTHS)
    # The same prompts once without prompt logprobs: their blocks are now in the prefix cache,
    # which the requests below must not use (a hit would leave positions unscored).
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    blocks = llm.engine.block_manager
    hits_before = blocks.prefix_cache_hits
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert blocks.prefix_cache_hits == hits_before
    for prompt, output in zip(prompts, outputs):
        check_against_reference(output.prompt_logprobs, prompt, reference_logprobs(path, prompt))
    llm.engine.check_no_leaks()


def test_prompt_logprobs_survive_preemption(checkpoint):
    path = checkpoint("llama-gqa")
    # 8 blocks of 16 = 128 token slots for five requests of up to 96 tokens each: preempted ones
    # are recomputed, and must neither lose nor repeat prompt logprobs.
    llm = LLM(path, num_kv_blocks=8, max_num_batched_tokens=64)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, (30, 45, 20, 60, 38))
    params = SamplingParams(temperature=0.0, max_tokens=36, ignore_eos=True, prompt_logprobs=TOP)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        check_against_reference(output.prompt_logprobs, prompt, reference_logprobs(path, prompt))
    llm.engine.check_no_leaks()


def test_prompt_logprobs_in_each_output_kind(demo_model_dir):
    llm = LLM(str(demo_model_dir), num_kv_blocks=64, max_num_batched_tokens=8)
    engine = llm.engine
    prompt = make_prompts(engine.hf_config.vocab_size, (20,))[0]
    seen: dict[RequestOutputKind, list] = {}
    for kind in RequestOutputKind:
        params = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=0, output_kind=kind)
        engine.add_request(kind.name, prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.setdefault(RequestOutputKind[output.request_id], []).append(output)
    cumulative = seen[RequestOutputKind.CUMULATIVE]
    full = cumulative[-1].prompt_logprobs
    assert len(full) == len(prompt) and all(len(entry) == 1 for entry in full[1:])
    assert all(output.prompt_logprobs == full for output in cumulative)
    deltas = seen[RequestOutputKind.DELTA]
    assert_close(deltas[0].prompt_logprobs, full)
    assert all(output.prompt_logprobs is None for output in deltas[1:])
    merged = deltas[0]
    for output in deltas[1:]:
        merged = merged.add(output)
    assert merged.prompt_logprobs == deltas[0].prompt_logprobs
    (final,) = seen[RequestOutputKind.FINAL_ONLY]
    assert_close(final.prompt_logprobs, full)
    engine.check_no_leaks()


def assert_close(entries, expected) -> None:
    """Equal up to float noise: the requests compared ran in different rows of a batch."""
    assert len(entries) == len(expected) and entries[0] is None
    for entry, expected_entry in zip(entries[1:], expected[1:]):
        assert entry.keys() == expected_entry.keys()
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(expected_entry[token_id].logprob, abs=1e-4)


def test_prompt_logprobs_must_be_a_count():
    with pytest.raises(InvalidParameter) as caught:
        SamplingParams(prompt_logprobs=-1)
    assert caught.value.field == "prompt_logprobs"
