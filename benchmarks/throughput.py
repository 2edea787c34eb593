"""Offline throughput: Pagoda's `LLM.generate` against transformers `generate` with static
batching and against transformers' own continuous batching, on the same model and the same
synthetic ShareGPT-like workload, in one run.

Static batching is the baseline of vLLM's headline: requests are batched in arrival order,
padded on the left, and each batch decodes until its longest request is done. Both sides ignore
EOS and generate exactly each request's output length, so they do the same useful work; throughput
counts useful generated tokens per second of wall time. A second, untimed Pagoda pass samples the
KV cache every step and reports the waste (1 - tokens / slots of used blocks) at peak usage.

With `--workload fixed`, every pair of `--input-lens` x `--output-lens` gets `--num-requests`
random prompts of exactly that length, each generating exactly that many tokens: Pagoda against
static batching (by default) per pair. Equal lengths are static batching's best case (no padding,
no request waits for a longer one), so this isolates the engine's own speed from scheduling.

    python benchmarks/throughput.py [--model DIR] [--num-requests 200] [--hf-batch-size 32]
    python benchmarks/throughput.py --workload fixed --input-lens 128,512 --output-lens 128,512
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --model DIR

Pagoda and its transformers peers run on the same --device in the same --dtype (CPU and float32
by default). Writes benchmarks/results/throughput-DEVICE.json (throughput-fixed-DEVICE.json for
the sweep), DEVICE being cpu or cuda.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from common import (
    Request,
    add_run_args,
    fixed_length,
    machine_description,
    output_path,
    run_watching_kv,
    sharegpt_like,
)
from plots import plot_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.config import DTYPES
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
    """An untimed second pass, stepping the engine by hand: KV stats at peak block use."""
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
              for r in requests]
    peaks = run_watching_kv(llm.engine, [r.prompt_token_ids for r in requests], params)
    return {
        "peak_used_blocks": peaks.peak_used_blocks,
        "peak_tokens": peaks.tokens_at_peak,
        "total_blocks": llm.engine.block_manager.pool.num_blocks,
        "block_size": llm.engine.block_manager.block_size,
        "kv_waste_at_peak": peaks.kv_waste_at_peak,
    }


def run_transformers_static(model_dir: Path, requests: list[Request], batch_size: int,
                            device: str, dtype: torch.dtype) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
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
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                do_sample=False,
                max_new_tokens=longest, min_new_tokens=longest, pad_token_id=0,
            )
    return time.perf_counter() - started


def run_transformers_continuous(model_dir: Path, requests: list[Request], device: str,
                                dtype: torch.dtype) -> float:
    """transformers' own continuous batching (transformers 5's paged manager behind
    `generate_batch`), driven request by request so each gets its own output length."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="paged|sdpa"
    ).to(device).eval()
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


def peer_runs(args: argparse.Namespace, model_dir: Path, requests: list[Request],
              peers: list[str], pagoda_seconds: float) -> dict[str, dict]:
    """Run the named transformers peers on the same requests, device and dtype as Pagoda;
    seconds, tokens/s and Pagoda's speedup over each."""
    useful_tokens = sum(r.output_len for r in requests)
    dtype = DTYPES[args.dtype]
    results: dict[str, dict] = {}
    if "static" in peers:
        seconds = run_transformers_static(model_dir, requests, args.hf_batch_size, args.device,
                                          dtype)
        results["transformers_static"] = {"seconds": seconds, "batch_size": args.hf_batch_size}
    if "continuous" in peers:
        seconds = run_transformers_continuous(model_dir, requests, args.device, dtype)
        results["transformers_continuous"] = {"seconds": seconds}
    for peer in results.values():
        peer.update(tokens_per_s=useful_tokens / peer["seconds"],
                    pagoda_speedup=peer["seconds"] / pagoda_seconds)
    return results


def sharegpt_mix(args: argparse.Namespace, llm: LLM, model_dir: Path) -> dict:
    requests = sharegpt_like(args.num_requests, llm.engine.hf_config.vocab_size,
                             llm.engine.max_model_len, args.seed, args.length_scale)
    useful_tokens = sum(r.output_len for r in requests)
    pagoda_seconds = run_pagoda(llm, requests)
    waste = peak_kv_waste(llm, requests)
    peers = args.peers or ["static", "continuous"]
    return {
        "benchmark": "offline throughput, ShareGPT-like mix",
        "num_requests": len(requests),
        "mean_prompt_tokens": float(np.mean([len(r.prompt_token_ids) for r in requests])),
        "mean_output_tokens": float(np.mean([r.output_len for r in requests])),
        "useful_output_tokens": useful_tokens,
        "pagoda": {"seconds": pagoda_seconds, "tokens_per_s": useful_tokens / pagoda_seconds,
                   "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens},
        **peer_runs(args, model_dir, requests, peers, pagoda_seconds),
        **waste,
        "requests": [asdict(r) | {"prompt_token_ids": len(r.prompt_token_ids)} for r in requests],
    }


def fixed_sweep(args: argparse.Namespace, llm: LLM, model_dir: Path) -> dict:
    """Every (input, output) length pair: Pagoda, then its peers, on the same requests."""
    vocab_size = llm.engine.hf_config.vocab_size
    run_pagoda(llm, fixed_length(2, 16, 4, vocab_size, args.seed))  # untimed: first-call costs
    points = []
    pairs = [(i, o) for i in args.input_lens for o in args.output_lens]
    for point_index, (input_len, output_len) in enumerate(tqdm(pairs, desc="length pairs")):
        requests = fixed_length(args.num_requests, input_len, output_len, vocab_size,
                                args.seed + point_index)
        useful_tokens = args.num_requests * output_len
        pagoda_seconds = run_pagoda(llm, requests)
        points.append({
            "input_len": input_len, "output_len": output_len,
            "pagoda": {"seconds": pagoda_seconds, "tokens_per_s": useful_tokens / pagoda_seconds},
            **peer_runs(args, model_dir, requests, args.peers or ["static"], pagoda_seconds),
        })
    return {"benchmark": "offline throughput, fixed lengths", "num_requests": args.num_requests,
            "points": points}


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--workload", choices=("sharegpt", "fixed"), default="sharegpt",
                        help="ShareGPT-like mix, or a sweep of fixed (input, output) lengths")
    parser.add_argument("--num-requests", type=int, default=None,
                        help="requests of the mix, or per length pair (default: 200 / 32)")
    parser.add_argument("--length-scale", type=float, default=1.0,
                        help="multiply ShareGPT's mean lengths (smaller for quick runs)")
    parser.add_argument("--input-lens", type=int_list, default=[128, 512],
                        help="fixed workload: prompt lengths, comma-separated")
    parser.add_argument("--output-lens", type=int_list, default=[128, 512],
                        help="fixed workload: output lengths, comma-separated")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where Pagoda and the peers run (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights, activations and KV cache (default: float32)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--peers", type=lambda text: text.split(","), default=None,
                        help="transformers peers to run: static (generate), continuous "
                             "(its continuous batching), comma-separated (default: both for "
                             "the mix, static for the fixed sweep)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    add_run_args(parser, quick="a few short requests")
    args = parser.parse_args()
    if args.num_requests is None:
        args.num_requests = 200 if args.workload == "sharegpt" else 32
    if args.quick:
        args.num_requests, args.length_scale, args.hf_batch_size = 8, 0.1, 4
        args.input_lens, args.output_lens = [16, 64], [8]
    return args


def main() -> None:
    args = parse_args()
    model_dir = Path(args.model) if args.model else demo_model_path()
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    run = fixed_sweep if args.workload == "fixed" else sharegpt_mix
    result = {
        "machine": machine_description(),
        "model": str(model_dir) if args.model else "pagoda demo model",
        "notes": args.notes,
        **run(args, llm, model_dir),
        "settings": vars(args),
    }
    workload = "" if args.workload == "sharegpt" else "-fixed"
    name = f"throughput{workload}-{args.device}.json"
    output = output_path(args.output, name, args.quick)
    output.write_text(json.dumps(result, indent=2) + "\n")
    summary = result["points"] if args.workload == "fixed" else {
        key: result[key] for key in ("pagoda", "transformers_static", "transformers_continuous",
                                     "kv_waste_at_peak") if key in result}
    print(json.dumps(summary, indent=2))
    print(f"wrote {output} and {plot_file(output)}")


if __name__ == "__main__":
    main()
