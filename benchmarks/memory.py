"""KV cache memory: waste at peak, blocks saved by sharing, peak process memory.

Each workload runs to completion in a fresh in-process engine stepped by hand; after every step
the KV cache is sampled (common.run_watching_kv):

- sharegpt: ShareGPT-like requests, greedy, one sample each (nothing to share);
- parallel_sampling_n4: the same prompts with n=4 (temperature 1, seeded): the samples fork
  from the prompt's blocks and copy a shared partial block on their first write;
- beam_width4: the same prompts with beam search, width 4: beams fork and are freed per step;
- shared_system_prompt_chat: a long system prompt common to every request plus a short distinct
  user turn, arriving one every few steps, prefix caching on: later requests reuse its blocks.

Reported per workload: peak KV blocks used against the peak the same live sequences would hold
if none shared (each its own copy of its tokens), the blocks sharing saved, KV waste at peak
(1 - tokens / slots of the used blocks), the prefix cache hit rate, the peak process RSS while
it ran and, on CUDA, torch.cuda.max_memory_allocated.

    python benchmarks/memory.py [--model DIR] [--num-requests 48] [--quick]

Writes benchmarks/results/memory-cpu.json and memory-cpu.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from common import (
    add_run_args,
    machine_description,
    output_path,
    random_prompt,
    run_watching_kv,
    sharegpt_like,
)
from plots import plot_file
from tqdm.auto import tqdm
from transformers import AutoConfig

from pagoda.backend import LLMEngine, SamplingParams
from pagoda.backend.config import EngineConfig
from pagoda.backend.demo import demo_model_path

# Short distinct user turns after the shared system prompt, in tokens.
USER_TURN_TOKENS = (16, 64)


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    params: list[SamplingParams]
    enable_prefix_caching: bool
    arrive_every_steps: int  # 0: all requests at once


@dataclass(slots=True)
class WorkloadSpec:
    """What every workload draws from: sizes and the model's limits."""

    num_requests: int
    length_scale: float
    width: int
    system_prompt_tokens: int
    vocab_size: int
    max_model_len: int
    seed: int

    def sharegpt_requests(self) -> tuple[list[list[int]], list[int]]:
        requests = sharegpt_like(self.num_requests, self.vocab_size, self.max_model_len,
                                 self.seed, self.length_scale)
        return [r.prompt_token_ids for r in requests], [r.output_len for r in requests]


def sharegpt(spec: WorkloadSpec) -> Workload:
    prompts, output_lens = spec.sharegpt_requests()
    params = [SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True)
              for length in output_lens]
    return Workload(prompts, params, enable_prefix_caching=False, arrive_every_steps=0)


def parallel_sampling(spec: WorkloadSpec) -> Workload:
    prompts, output_lens = spec.sharegpt_requests()
    params = [SamplingParams(n=spec.width, temperature=1.0, seed=index, max_tokens=length,
                             ignore_eos=True) for index, length in enumerate(output_lens)]
    return Workload(prompts, params, enable_prefix_caching=False, arrive_every_steps=0)


def beam_search(spec: WorkloadSpec) -> Workload:
    prompts, output_lens = spec.sharegpt_requests()
    params = [SamplingParams(n=spec.width, use_beam_search=True, temperature=0.0,
                             max_tokens=length, ignore_eos=True) for length in output_lens]
    return Workload(prompts, params, enable_prefix_caching=False, arrive_every_steps=0)


def shared_system_prompt_chat(spec: WorkloadSpec) -> Workload:
    rng = np.random.default_rng(spec.seed)
    system = random_prompt(rng, spec.system_prompt_tokens, spec.vocab_size)
    _, output_lens = spec.sharegpt_requests()
    prompts = [system + rng.integers(3, spec.vocab_size, rng.integers(*USER_TURN_TOKENS)).tolist()
               for _ in output_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True)
              for length in output_lens]
    # Staggered, as a chat server sees them: the first request's prefill publishes the system
    # prompt's blocks before the next arrives (all at once, the first step would prefill
    # several copies before any is cached).
    return Workload(prompts, params, enable_prefix_caching=True, arrive_every_steps=2)


WORKLOADS: dict[str, Callable[[WorkloadSpec], Workload]] = {
    "sharegpt": sharegpt,
    "parallel_sampling_n4": parallel_sampling,
    "beam_width4": beam_search,
    "shared_system_prompt_chat": shared_system_prompt_chat,
}


def measure(name: str, model: str, num_kv_blocks: int | None,
            workload: Workload) -> dict[str, object]:
    """Run one workload in a fresh engine; its KV peaks and memory figures."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine = LLMEngine(EngineConfig(model=model, num_kv_blocks=num_kv_blocks,
                                    enable_prefix_caching=workload.enable_prefix_caching))
    started = time.perf_counter()
    peaks = run_watching_kv(engine, workload.prompts, workload.params,
                            workload.arrive_every_steps, desc=name)
    seconds = time.perf_counter() - started
    blocks = engine.block_manager
    result = {
        **asdict(peaks),
        "blocks_saved_at_peak": peaks.peak_unshared_blocks - peaks.peak_used_blocks,
        "fewer_blocks": 1 - peaks.peak_used_blocks / peaks.peak_unshared_blocks,
        "num_requests": len(workload.prompts),
        "samples_per_request": workload.params[0].n,
        "mean_prompt_tokens": float(np.mean([len(p) for p in workload.prompts])),
        "mean_max_tokens": float(np.mean([p.max_tokens for p in workload.params])),
        "enable_prefix_caching": workload.enable_prefix_caching,
        "prefix_cache_hit_rate": (blocks.prefix_cache_hits / blocks.prefix_cache_queries
                                  if blocks.prefix_cache_queries else None),
        "num_copy_on_write": blocks.num_copy_on_write,
        "num_preemptions": engine.scheduler.num_preemptions,
        "total_blocks": blocks.pool.num_blocks,
        "seconds": seconds,
        "cuda_max_allocated_mib": (torch.cuda.max_memory_allocated() / 2**20
                                   if torch.cuda.is_available() else None),
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--num-requests", type=int, default=48, help="requests per workload")
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="multiply ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--system-prompt-tokens", type=int, default=1024)
    parser.add_argument("--workloads", type=lambda text: text.split(","), default=list(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV pool size (default: the engine's, 2 GiB on CPU)")
    add_run_args(parser, quick="a few short requests")
    args = parser.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {list(WORKLOADS)}")
    if args.quick:
        args.num_requests, args.length_scale, args.system_prompt_tokens = 6, 0.1, 128
        args.num_kv_blocks = args.num_kv_blocks or 256
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = args.model or str(demo_model_path())
    hf_config = AutoConfig.from_pretrained(model)
    spec = WorkloadSpec(args.num_requests, args.length_scale, width=4,
                        system_prompt_tokens=args.system_prompt_tokens,
                        vocab_size=hf_config.vocab_size,
                        max_model_len=hf_config.max_position_embeddings, seed=args.seed)
    workloads = {}
    for name in tqdm(args.workloads, desc="workloads"):
        workloads[name] = measure(name, model, args.num_kv_blocks, WORKLOADS[name](spec))
        gc.collect()  # the last engine's KV pool goes before the next engine allocates its own
    result = {
        "benchmark": "KV memory",
        "machine": machine_description(),
        "model": args.model or "pagoda demo model",
        "notes": args.notes,
        "block_size": EngineConfig().block_size,
        "peak_rss_mib": max(w["peak_rss_mib"] for w in workloads.values()),
        "workloads": workloads,
        "settings": vars(args),
    }
    output = output_path(args.output, "memory-cpu.json", args.quick)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({name: {key: w[key] for key in (
        "peak_used_blocks", "peak_unshared_blocks", "fewer_blocks", "kv_waste_at_peak",
        "prefix_cache_hit_rate", "peak_rss_mib")} for name, w in workloads.items()}, indent=2))
    print(f"wrote {output} and {plot_file(output)}")


if __name__ == "__main__":
    main()
