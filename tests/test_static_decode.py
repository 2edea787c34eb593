"""The padded, static-buffer decode path (what CUDA graphs replay) run eagerly on CPU: greedy
outputs token-identical to the plain path for every model family, at batch 1, at each bucket's
edge and one past it, with shared prefixes, beams and preemption in the batch."""

from __future__ import annotations

import random

import pytest
from checkpoints import VARIANTS

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.attention import ATTENTION_BACKEND_ENV
from pagoda.backend.cuda_graphs import DecodeGraphRunner, cuda_graph_sizes

BUCKETS = [1, 2, 4, 8]


def run_both(path, batches, params, **engine_args) -> list[list]:
    """Each batch's completions' token ids, with and without the padded decode path (one engine
    per side, the batches run one after the other)."""
    results = []
    for static in (False, True):
        llm = LLM(str(path), static_decode_buffers=static, cuda_graph_sizes=BUCKETS,
                  enable_prefix_caching=False, **engine_args)
        assert (llm.engine.runner.graph_runner is not None) == static
        side = []
        for prompts in batches:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            side.append([[c.token_ids for c in o.outputs] for o in outputs])
        results.append(side)
        llm.engine.check_no_leaks()
    return results


def prompts_of(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 4000) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_decodes_are_token_identical_for_every_family(checkpoint, variant):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # Batch 1, a bucket's edge and one past it, and past the largest bucket (eager).
    batches = [prompts_of(size, size) for size in (1, 4, 5, 9)]
    plain, padded = run_both(checkpoint(variant), batches, greedy, num_kv_blocks=128,
                             max_num_seqs=16)
    assert padded == plain


def test_padded_decodes_with_samples_beams_and_preemption(checkpoint):
    path = checkpoint("llama-gqa")
    prompts = prompts_of(6, 7)
    params = [
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True),
        SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0, max_tokens=10),
        *[SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)] * 4,
    ]
    # 24 blocks of 16 tokens cannot hold every sequence at once: some are preempted.
    plain, padded = run_both(path, [prompts], params, num_kv_blocks=24, max_num_seqs=16)
    assert padded == plain


def test_default_buckets_cover_max_num_seqs():
    assert cuda_graph_sizes(1) == [1, 2, 4, 8]
    assert cuda_graph_sizes(256)[:6] == [1, 2, 4, 8, 16, 24]
    assert cuda_graph_sizes(256)[-2:] == [240, 256] and 64 in cuda_graph_sizes(256)
    assert cuda_graph_sizes(100)[-1] == 112


def test_only_decode_batches_within_the_buckets_take_the_padded_path(demo_model_dir):
    llm = LLM(str(demo_model_dir), static_decode_buffers=True, cuda_graph_sizes=[1, 2])
    runner = llm.engine.runner.graph_runner
    assert isinstance(runner, DecodeGraphRunner)
    taken: list[int] = []
    original = runner.hidden_states

    def counting(model_input):
        taken.append(model_input.num_tokens)
        return original(model_input)

    runner.hidden_states = counting
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[5, 6, 7], [8, 9], [10, 11, 12]], greedy, use_tqdm=False)
    assert taken == []  # three sequences decode together: past the largest bucket
    llm.generate([[5, 6, 7], [8, 9]], greedy, use_tqdm=False)
    assert taken == [2, 2, 2]  # the prefill runs eagerly, then three decode steps of two
    llm.engine.check_no_leaks()


def test_triton_decode_metadata_from_the_static_buffers(demo_model_dir, monkeypatch):
    """The Triton backend's graph-capturable metadata (prepare_decode: tensors only, launches
    sized for max_model_len), run eagerly under Triton's interpreter: the same tokens as its
    per-step metadata."""
    pytest.importorskip("pagoda.backend.attention.triton_backend")
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain, padded = run_both(demo_model_dir, [prompts_of(3, 11)], greedy, num_kv_blocks=32,
                             max_model_len=256, max_num_seqs=8)
    assert padded == plain
