"""Batch-1 decode on a GPU: tokens/s eager against CUDA graphs, and the fraction of the HBM
roofline the step reaches (bytes of weights and KV read per step over the step time, against
the bandwidth of a device-to-device copy measured in the same run).

    python benchmarks/gpu/decode.py --model DIR [--prompt-len 128] [--new-tokens 256] [--dry-run]

--dry-run runs the same code on a CPU, eagerly, with few tokens, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pagoda.backend import LLM, SamplingParams


def copy_bandwidth(device: torch.device, num_bytes: int = 2 * 1024**3) -> float:
    """Bytes per second a device-to-device copy moves (it reads and writes each byte)."""
    source = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize(device)
    return 2 * num_bytes * 10 / (time.perf_counter() - started)


def decode_seconds_per_token(llm: LLM, prompt_len: int, new_tokens: int) -> float:
    """Seconds per generated token after the first (the first includes the prefill)."""
    prompt = [(7 * i) % 4000 + 5 for i in range(prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    metrics = output.metrics
    return (metrics.finished_time - metrics.first_token_time) / (new_tokens - 1)


def step_bytes(llm: LLM, prompt_len: int, new_tokens: int) -> float:
    """Bytes a decode step reads: every weight once, and the KV cache of the average context."""
    model = llm.engine.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    num_layers, num_kv_heads, head_dim = model.kv_shape
    kv_per_token = 2 * num_layers * num_kv_heads * head_dim * llm.engine.dtype.itemsize
    return weights + kv_per_token * (prompt_len + new_tokens / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    new_tokens = 8 if args.dry_run else args.new_tokens
    results: dict[str, object] = {"model": args.model, "prompt_len": args.prompt_len,
                                  "new_tokens": new_tokens, "dry_run": args.dry_run}
    for mode, eager in (("eager", True), ("graphs", False)):
        if args.dry_run and not eager:
            continue  # no CUDA graphs without CUDA
        llm = LLM(args.model, device=device, dtype="bfloat16" if not args.dry_run else "float32",
                  enforce_eager=eager, max_num_seqs=8, num_kv_blocks=1024)
        seconds = decode_seconds_per_token(llm, args.prompt_len, new_tokens)
        results[mode] = {"tokens_per_s": 1 / seconds, "step_ms": seconds * 1e3,
                         "bytes_per_step": step_bytes(llm, args.prompt_len, new_tokens)}
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
    if not args.dry_run:
        peak = copy_bandwidth(torch.device("cuda"))
        results["copy_bandwidth_gb_s"] = peak / 1e9
        results["device"] = torch.cuda.get_device_name()
        for mode in ("eager", "graphs"):
            entry = results[mode]
            entry["roofline_fraction"] = entry["bytes_per_step"] / (entry["step_ms"] / 1e3) / peak
        results["graphs_speedup"] = results["graphs"]["tokens_per_s"] / results["eager"]["tokens_per_s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
