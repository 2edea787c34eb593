"""Offline throughput: Pagoda's `LLM.generate` against transformers `generate` with static
batching and against transformers' own continuous batching, on the same model and the same
synthetic ShareGPT-like workload, in one run.

Static batching is the baseline of vLLM's headline: requests are batched in arrival order,
padded on the left, and each batch decodes until its longest request is done. Both sides ignore
EOS and generate exactly each request's output length, so they do the same useful work; throughput
counts useful generated tokens per second of wall time. A second, untimed Pagoda pass samples the
KV cache every step and reports the waste (1 - tokens / slots of used blocks) at peak usage.

    python benchmarks/throughput.py [--model DIR] [--num-requests 200] [--hf-batch-size 32]

Writes benchmarks/results/throughput-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, Request, machine_description, sharegpt_like
from plots import plot_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.demo import demo_model_path

def run_pagoda(llm: LLM, requests: list[Request]) -> float:
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests
    ]
    started = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params)
    elapsed = time.perf_counter() - started
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    assert generated == [r.output_len for r in requests], "pagoda generated unexpected lengths"
    return elapsed


def peak_kv_waste(llm: LLM, requests: list[Request]) -> dict[str, float]:
    """Step the engine by hand, reading KV stats after every step; stats at peak block use."""
    engine = llm.engine
    for index, request in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
        engine.add_request(f"waste-{index}", request.prompt_token_ids, params)
    peak = engine.kv_stats()
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.kv_stats()
        if stats.num_used_blocks > peak.num_used_blocks:
            peak = stats
    engine.check_no_leaks()
    return {
        "peak_used_blocks": peak.num_used_blocks,
        "peak_tokens": peak.num_tokens,
        "total_blocks": peak.num_blocks,
        "block_size": peak.block_size,
        "kv_waste_at_peak": peak.waste,
    }


def run_transformers_static(model_dir: Path, requests: list[Request], batch_size: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.perf_counter()
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for batch in tqdm(batches, desc="transformers static batches"):
        width = max(len(r.prompt_token_ids) for r in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, request in enumerate(batch):  # left padding, as decoder-only generation needs
            input_ids[row, width - len(request.prompt_token_ids) :] = torch.tensor(
                request.prompt_token_ids
            )
            attention_mask[row, width - len(request.prompt_token_ids) :] = 1
        longest = max(r.output_len for r in batch)
        with torch.no_grad():
            model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=longest, min_new_tokens=longest, pad_token_id=0,
            )
    return time.perf_counter() - started


def run_transformers_continuous(model_dir: Path, requests: list[Request]) -> float:
    """transformers' own continuous batching (transformers 5's paged manager behind
    `generate_batch`), driven request by request so each gets its own output length."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="paged|sdpa"
    ).eval()
    config = GenerationConfig(do_sample=False, eos_token_id=None,
                              max_new_tokens=max(r.output_len for r in requests))
    started = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=config, block=True) as manager:
        for index, request in enumerate(requests):
            manager.add_request(request.prompt_token_ids, request_id=f"r{index}",
                                max_new_tokens=request.output_len)
        finished = 0
        with tqdm(total=len(requests), desc="transformers continuous batching") as progress:
            while finished < len(requests):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    assert len(result.generated_tokens) == requests[int(result.request_id[1:])].output_len
                    finished += 1
                    progress.update(1)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="multiply ShareGPT's mean lengths (smaller for quick runs)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--peers", default="static,continuous",
                        help="transformers peers to run: static (generate), continuous "
                             "(its continuous batching), comma-separated")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else demo_model_path()
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    requests = sharegpt_like(args.num_requests, llm.engine.hf_config.vocab_size,
                             llm.engine.max_model_len, args.seed, args.length_scale)
    useful_tokens = sum(r.output_len for r in requests)

    pagoda_seconds = run_pagoda(llm, requests)
    waste = peak_kv_waste(llm, requests)
    peers = set(args.peers.split(","))
    peer_results: dict[str, dict] = {}
    if "static" in peers:
        seconds = run_transformers_static(model_dir, requests, args.hf_batch_size)
        peer_results["transformers_static"] = {
            "seconds": seconds, "tokens_per_s": useful_tokens / seconds,
            "batch_size": args.hf_batch_size, "pagoda_speedup": seconds / pagoda_seconds}
    if "continuous" in peers:
        seconds = run_transformers_continuous(model_dir, requests)
        peer_results["transformers_continuous"] = {
            "seconds": seconds, "tokens_per_s": useful_tokens / seconds,
            "pagoda_speedup": seconds / pagoda_seconds}

    result = {
        "benchmark": "offline throughput, ShareGPT-like mix",
        "machine": machine_description(),
        "model": str(model_dir) if args.model else "pagoda demo model",
        "num_requests": len(requests),
        "mean_prompt_tokens": float(np.mean([len(r.prompt_token_ids) for r in requests])),
        "mean_output_tokens": float(np.mean([r.output_len for r in requests])),
        "useful_output_tokens": useful_tokens,
        "pagoda": {"seconds": pagoda_seconds, "tokens_per_s": useful_tokens / pagoda_seconds,
                   "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens},
        **peer_results,
        **waste,
        "settings": vars(args),
        "requests": [asdict(r) | {"prompt_token_ids": len(r.prompt_token_ids)} for r in requests],
    }
    output = Path(args.output) if args.output else RESULTS_DIR / "throughput-cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("pagoda", *peer_results, "kv_waste_at_peak")},
                     indent=2))
    print(f"wrote {output} and {plot_file(output)}")


if __name__ == "__main__":
    main()
