"""What prefix sharing buys: KV memory and throughput for parallel sampling and beam search,
and time to first token with prefix caching. Every comparison runs both sides in one process.

    python benchmarks/sharing.py [--model DIR] [--quick]

1. Memory: n=4 sampling and beam width 4 on 512+-token prompts. Each step compares the blocks
   in use with the blocks the same live sequences would need if none were shared (each holding
   its own copy of its history); reports both peaks.
2. Throughput at the same KV budget: requests with n=4 against the same samples submitted as
   independent requests (no fork, prefix caching off, each with its sample's seed, so the
   outputs are identical), generated tokens per second; 9 alternating rounds.
3. Prefix caching: time to first token of a request repeating a 1k-token prefix, cache on
   against off; and throughput on unique prompts (0% hits), cache on against off, 15
   alternating rounds.

Ratios are medians of the per-round ratios: each round runs both sides back to back, so drift
in a shared machine's speed (which moves single runs by +-20%) mostly cancels within a round.

Writes benchmarks/results/sharing-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, machine_description, random_prompt, run_watching_kv, sharegpt_like
from plots import plot_file

from pagoda.backend import LLM, LLMEngine, SamplingParams
from pagoda.backend.config import EngineConfig
from pagoda.backend.demo import demo_model_path
from pagoda.backend.sequence import sample_seed


def peak_blocks(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Run to completion; peak of blocks used and of blocks an unshared layout would need."""
    peaks = run_watching_kv(engine, prompts, [params] * len(prompts), desc="peak KV blocks")
    return {
        "peak_blocks_shared": peaks.peak_used_blocks,
        "peak_blocks_unshared": peaks.peak_unshared_blocks,
        "fewer_blocks": 1 - peaks.peak_used_blocks / peaks.peak_unshared_blocks,
    }


def memory(engine: dict[str, str], vocab: int, rng: np.random.Generator, quick: bool) -> dict:
    prompts = [random_prompt(rng, int(rng.integers(512, 700)), vocab) for _ in range(2 if quick else 4)]
    max_tokens = 64 if quick else 128
    config = dict(**engine, num_kv_blocks=2048, enable_prefix_caching=False)
    sampling = SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True)
    beam = SamplingParams(n=4, use_beam_search=True, temperature=0.0, max_tokens=max_tokens,
                          ignore_eos=True)
    return {
        "parallel_sampling_n4": peak_blocks(LLMEngine(EngineConfig(**config)), prompts, sampling),
        "beam_search_width4": peak_blocks(LLMEngine(EngineConfig(**config)), prompts, beam),
        "num_prompts": len(prompts),
        "max_tokens": max_tokens,
    }


def throughput_at_same_budget(engine: dict[str, str], vocab: int, rng: np.random.Generator, quick: bool,
                              num_kv_blocks: int, rounds: int) -> dict:
    num_requests, n, max_tokens = (4, 4, 48) if quick else (12, 4, 128)
    prompts = [random_prompt(rng, int(rng.integers(512, 640)), vocab) for _ in range(num_requests)]
    generated = num_requests * n * max_tokens
    shared_params = SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=max_tokens,
                                   ignore_eos=True)
    # Sample i of a seeded request draws from seed sample_seed(seed, i): the independent requests
    # generate exactly the shared samples, so both sides do the same work.
    unshared_params = [SamplingParams(temperature=1.0, seed=sample_seed(0, i), max_tokens=max_tokens,
                                      ignore_eos=True) for _ in prompts for i in range(n)]
    sides = {
        "shared": (prompts, shared_params),
        "unshared": ([prompt for prompt in prompts for _ in range(n)], unshared_params),
    }
    runs: dict[str, list[dict]] = {"shared": [], "unshared": []}
    samples = {}
    for _ in range(rounds):  # alternate, so drift on a shared machine hits both sides alike
        for name, (batch, params) in sides.items():
            llm = LLM(**engine, num_kv_blocks=num_kv_blocks, enable_prefix_caching=False)
            started = time.perf_counter()
            outputs = llm.generate(batch, params, use_tqdm=False)
            seconds = time.perf_counter() - started
            llm.engine.check_no_leaks()
            samples[name] = [c.token_ids for output in outputs for c in output.outputs]
            runs[name].append({"seconds": seconds, "tokens_per_s": generated / seconds,
                               "preemptions": llm.engine.scheduler.num_preemptions})
        assert samples["shared"] == samples["unshared"], "sharing changed the samples"
    speedups = [u["seconds"] / s["seconds"] for s, u in zip(runs["shared"], runs["unshared"])]
    median = {name: statistics.median(run["seconds"] for run in side) for name, side in runs.items()}
    return {
        "shared": {"median_seconds": median["shared"],
                   "tokens_per_s": generated / median["shared"], "runs": runs["shared"]},
        "unshared": {"median_seconds": median["unshared"],
                     "tokens_per_s": generated / median["unshared"], "runs": runs["unshared"]},
        "speedup": statistics.median(speedups),
        "speedup_per_round": speedups,
        "rounds": rounds, "num_requests": num_requests, "n": n, "max_tokens": max_tokens,
        "num_kv_blocks": num_kv_blocks,
    }


def prefix_caching_ttft(engine: dict[str, str], vocab: int, rng: np.random.Generator, trials: int) -> dict:
    prefix = random_prompt(rng, 1024, vocab)
    timings: dict[str, list[float]] = {"on": [], "off": []}
    for caching in ("off", "on"):
        llm = LLM(**engine, num_kv_blocks=512, enable_prefix_caching=caching == "on")
        llm.generate(prefix + [7], SamplingParams(max_tokens=1), use_tqdm=False)  # warm
        for trial in range(trials):
            prompt = prefix + random_prompt(rng, 9, vocab)[1:]
            started = time.perf_counter()
            output = llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)[0]
            timings[caching].append(time.perf_counter() - started)
            assert output.metrics.first_token_time is not None
        llm.engine.check_no_leaks()
    off, on = statistics.median(timings["off"]), statistics.median(timings["on"])
    return {"ttft_median_s_cache_off": off, "ttft_median_s_cache_on": on, "speedup": off / on,
            "trials": trials, "prefix_tokens": 1024}


def zero_hit_cost(engine: dict[str, str], vocab: int, max_model_len: int, rounds: int, quick: bool) -> dict:
    requests = sharegpt_like(24 if quick else 64, vocab, max_model_len, seed=3, scale=0.25)
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    engines = {name: LLM(**engine, enable_prefix_caching=name == "on") for name in ("off", "on")}
    seconds: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):  # alternate, so drift on a shared machine hits both sides alike
        for name, llm in engines.items():
            # Distinct prompts every round (first token differs), so the cache never hits.
            prompts = [[2 + len(seconds[name])] + r.prompt_token_ids[1:] for r in requests]
            started = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds[name].append(time.perf_counter() - started)
    assert engines["on"].engine.block_manager.prefix_cache_hits == 0
    off, on = statistics.median(seconds["off"]), statistics.median(seconds["on"])
    costs = [on_s / off_s - 1 for off_s, on_s in zip(seconds["off"], seconds["on"])]
    return {"median_s_cache_off": off, "median_s_cache_on": on,
            "throughput_cost": statistics.median(costs), "throughput_cost_per_round": costs,
            "rounds": rounds, "runs_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument("--num-kv-blocks", type=int, default=320,
                        help="KV budget of the throughput comparison")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="float32", help="weights, activations and KV cache")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model = args.model or str(demo_model_path())
    engine = {"model": model, "device": args.device, "dtype": args.dtype}
    probe = LLMEngine(EngineConfig(**engine, num_kv_blocks=64))
    vocab, max_model_len = probe.hf_config.vocab_size, probe.hf_config.max_position_embeddings
    rng = np.random.default_rng(0)
    result = {
        "benchmark": "prefix sharing",
        "machine": machine_description(),
        "model": args.model or "pagoda demo model",
        "device": args.device, "dtype": args.dtype,
        "memory": memory(engine, vocab, rng, args.quick),
        "throughput_same_kv_budget": throughput_at_same_budget(
            engine, vocab, rng, args.quick, args.num_kv_blocks, 1 if args.quick else 9),
        "prefix_caching_ttft": prefix_caching_ttft(engine, vocab, rng, 3 if args.quick else 7),
        "prefix_caching_zero_hit_cost": zero_hit_cost(
            engine, vocab, max_model_len, 3 if args.quick else 15, args.quick),
    }
    output = Path(args.output) if args.output else RESULTS_DIR / f"sharing-{args.device}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    print(f"wrote {output} and {plot_file(output)}")


if __name__ == "__main__":
    main()
