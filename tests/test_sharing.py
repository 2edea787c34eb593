"""Prefix sharing: parallel samples fork one prompt prefill, beam search against transformers,
prefix caching across requests, and nothing leaking on aborts."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, LLMEngine, SamplingParams
from pagoda.backend.config import EngineConfig
from pagoda.backend.sequence import Sequence, sample_seed


@cache
def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompt(length: int, seed: int, vocab_size: int = 4000) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()


@pytest.mark.parametrize(
    ("width", "n", "length_penalty", "early_stopping"),
    [(4, 2, 1.0, False), (3, 3, 0.5, True), (4, 1, 2.0, "never"), (2, 2, 1.0, False)],
)
def test_beam_search_matches_transformers(checkpoint, width, n, length_penalty, early_stopping):
    path = checkpoint("llama-gqa")
    llm = LLM(str(path), num_kv_blocks=128, max_num_batched_tokens=64)
    vocab = llm.engine.hf_config.vocab_size
    prompts = [random_prompt(length, seed, vocab) for seed, length in enumerate((7, 21, 40))]
    max_tokens = 12
    params = SamplingParams(
        n=n, best_of=width, use_beam_search=True, temperature=0.0, max_tokens=max_tokens,
        length_penalty=length_penalty, early_stopping=early_stopping,
    )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            reference = hf_model(path).generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, num_beams=width, num_return_sequences=n, max_new_tokens=max_tokens,
                length_penalty=length_penalty, early_stopping=early_stopping,
                output_scores=True, return_dict_in_generate=True,
            )
        assert len(output.outputs) == n
        for completion, sequence, score in zip(
            output.outputs, reference.sequences, reference.sequences_scores
        ):
            generated = sequence[len(prompt):].tolist()
            padding = len(generated) - len(completion.token_ids)
            assert completion.token_ids + generated[len(generated) - padding:] == generated
            assert completion.score == pytest.approx(score.item(), abs=1e-4)
    llm.engine.check_no_leaks()


def test_parallel_samples_equal_separate_seeded_requests(demo_model_dir):
    prompt = random_prompt(45, 3)
    params = SamplingParams(n=4, temperature=1.0, top_k=50, seed=11, max_tokens=20, ignore_eos=True)
    shared = LLM(str(demo_model_dir), num_kv_blocks=64, enable_prefix_caching=False)
    together = shared.generate(prompt, params, use_tqdm=False)[0].outputs
    shared.engine.check_no_leaks()
    assert shared.engine.block_manager.num_copy_on_write > 0
    alone = LLM(str(demo_model_dir), num_kv_blocks=64, enable_prefix_caching=False)
    for index, completion in enumerate(together):
        single = SamplingParams(n=1, temperature=1.0, top_k=50, seed=sample_seed(11, index),
                                max_tokens=20, ignore_eos=True)
        assert alone.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids == \
            completion.token_ids
    assert len({tuple(c.token_ids) for c in together}) == 4
    alone.engine.check_no_leaks()


def test_sharing_stores_the_prompt_once(demo_model_dir):
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=256,
                                    enable_prefix_caching=False))
    prompt = random_prompt(520, 5)
    engine.add_request("a", prompt, SamplingParams(n=4, seed=1, max_tokens=8, ignore_eos=True))
    peak = peak_shared = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_manager.pool.num_used_blocks)
        peak_shared = max(peak_shared, engine.block_manager.pool.num_shared_blocks)
    # 520 + 8 tokens: 33 shared blocks plus one private tail block per sample at most.
    assert peak <= 33 + 4
    # Right after the fork all 33 prompt blocks are shared; at the first decode three samples
    # copy the partly filled one and the fourth keeps it.
    assert peak_shared == 33
    assert engine.block_manager.num_copy_on_write == 3
    engine.check_no_leaks()


def test_prefix_caching_on_and_off_give_identical_outputs(demo_model_dir):
    system = random_prompt(70, 8)
    prompts = [system + random_prompt(length, seed)[1:] for seed, length in ((1, 9), (2, 30), (3, 17))]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    results = []
    for caching in (False, True):
        llm = LLM(str(demo_model_dir), num_kv_blocks=64, enable_prefix_caching=caching,
                  max_num_batched_tokens=48)
        first = llm.generate(prompts, params, use_tqdm=False)
        second = llm.generate(prompts, params, use_tqdm=False)  # now served from the cache
        assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]
        results.append(first)
        llm.engine.check_no_leaks()
    for off, on in zip(*results):
        assert off.outputs[0].token_ids == on.outputs[0].token_ids
        assert off.outputs[0].cumulative_logprob == pytest.approx(on.outputs[0].cumulative_logprob,
                                                                  abs=1e-4)


def test_a_request_repeating_a_200_token_prefix_computes_only_its_new_tokens(demo_model_dir):
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64,
                                    enable_prefix_caching=True))
    prefix = random_prompt(200, 9)
    engine.add_request("first", prefix + [5, 6, 7], SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    hits_before = engine.block_manager.prefix_cache_hits
    engine.add_request("second", prefix + [8, 9], SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule()
    (item,) = plan.scheduled
    # 200 tokens = 12 full blocks of 16 found in the cache; only the rest is fed to the model.
    assert engine.block_manager.prefix_cache_hits - hits_before == 12
    assert item.seq.num_computed_tokens == 192
    assert item.num_new_tokens == 202 - 192
    engine.scheduler.update_from_output(plan, engine._execute(plan))
    assert item.seq.num_output_tokens == 1
    engine.abort("second")
    engine.check_no_leaks()


@pytest.mark.parametrize("kind", ["beam", "samples"])
def test_abort_mid_search_leaks_no_block(demo_model_dir, kind):
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    if kind == "beam":
        params = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0,
                                max_tokens=50, ignore_eos=True)
    else:
        params = SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=50, ignore_eos=True)
    engine.add_request("x", random_prompt(40, 2), params)
    for _ in range(6):
        engine.step()
    assert engine.block_manager.pool.num_used_blocks > 0
    engine.abort("x")
    engine.check_no_leaks()


def test_group_preempted_and_resumed_gives_identical_samples(demo_model_dir):
    params = SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=24, ignore_eos=True)
    prompt = random_prompt(30, 4)
    roomy = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = [c.token_ids for c in roomy.generate(prompt, params, use_tqdm=False)[0].outputs]
    tight = LLM(str(demo_model_dir), num_kv_blocks=14, max_num_batched_tokens=32)
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    outputs = tight.generate([random_prompt(20, 5), prompt, random_prompt(25, 6)],
                             [others, params, others], use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [c.token_ids for c in outputs[1].outputs] == reference
    tight.engine.check_no_leaks()


def test_a_resumed_group_recomputes_its_prompt_once_and_shares_it_again(demo_model_dir):
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    prompt = random_prompt(70, 7)  # 4 full blocks and 6 tokens
    roomy = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = [c.token_ids for c in roomy.generate(prompt, params, use_tqdm=False)[0].outputs]
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64,
                                    enable_prefix_caching=False))
    engine.add_request("r", prompt, params)
    for _ in range(4):  # the prompt, then 3 decode steps: the samples have diverged
        engine.step()
    group = engine.requests["r"]
    engine.scheduler.requeue([group])  # as a preemption does: every block freed
    plan = engine.scheduler.schedule()
    # Only the first sample runs: the prompt and whatever the samples have in common.
    assert [item.seq for item in plan.scheduled] == group.seqs[:1]
    assert plan.scheduled[0].num_new_tokens == group.common_history_len() >= 70
    engine.scheduler.requeue([group])
    engine.step()
    engine.step()  # the others fork, and every sample recomputes its own tokens
    tables = [engine.block_manager.block_ids(seq.seq_id) for seq in group.seqs]
    assert all(table[:4] == tables[0][:4] for table in tables)
    assert engine.block_manager.pool.num_shared_blocks == 4
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert [c.token_ids for c in outputs[-1].outputs] == reference
    engine.check_no_leaks()


def test_a_resumed_group_waits_until_all_its_samples_fit_not_only_their_common_part(
    demo_model_dir,
):
    params = SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=40, ignore_eos=True)
    prompt = random_prompt(70, 8)
    roomy = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = [c.token_ids for c in roomy.generate(prompt, params, use_tqdm=False)[0].outputs]
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64,
                                    enable_prefix_caching=False))
    blocks = engine.block_manager
    engine.add_request("r", prompt, params)
    for _ in range(21):  # 91 tokens each: 4 prompt blocks shared, 2 of each sample's own
        engine.step()
    group = engine.requests["r"]
    engine.scheduler.requeue([group])  # as a preemption does
    # Something else holds the pool but one block of what the group needs back: enough for its
    # common history (the first chunk it recomputes), not for all its samples.
    occupant = Sequence(seq_id=-1, index=0, token_ids=[0] * 16 * (64 - 11), num_prompt_tokens=0,
                        seed=None, detokenizer=None)
    assert blocks.allocate_slots(occupant, len(occupant.token_ids))
    assert blocks.num_free_blocks == 4 + 4 * 2 - 1
    output = engine.scheduler.schedule()
    # Admitting it would make it preempt itself once the samples fork and need their own blocks.
    assert output.scheduled == [] and list(engine.scheduler.waiting) == [group]
    blocks.free(occupant)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    assert [c.token_ids for c in outputs[-1].outputs] == reference
    assert engine.scheduler.num_preemptions == 0
    engine.check_no_leaks()


def test_beam_search_preempted_and_recomputed_in_chunks_gives_identical_beams(demo_model_dir):
    params = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=24,
                            ignore_eos=True)
    prompt = random_prompt(20, 12)
    roomy = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = [(c.token_ids, c.score)
                 for c in roomy.generate(prompt, params, use_tqdm=False)[0].outputs]
    # The beam request arrives last, so it is the one preempted (after 20+ beam steps); the
    # 16-token budget then splits its beams' recompute over several steps.
    tight = LLM(str(demo_model_dir), num_kv_blocks=12, max_num_batched_tokens=16)
    others = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    outputs = tight.generate([random_prompt(20, 13), random_prompt(25, 14), prompt],
                             [others, others, params], use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    beams = outputs[2].outputs
    assert [c.token_ids for c in beams] == [tokens for tokens, _ in reference]
    # Recomputed in other chunks, the same sums differ only by float rounding.
    assert [c.score for c in beams] == pytest.approx([score for _, score in reference], abs=1e-4)
    tight.engine.check_no_leaks()
