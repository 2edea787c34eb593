"""Offline throughput per CPU thread count, with and without a busy process beside it.

torch's intra-op threads meet at a barrier after every operation: when another process takes one
of the cores, the thread that lands there is descheduled and every other thread waits for it.
This runs the same offline workload with each `--threads` count (the engine's `cpu_threads`),
without and with a spinner (`while True: pass` pinned to core `--spin-core`, which ends by itself
after `--spin-limit-s` even if this script dies), alternating conditions and thread counts round
after round, so that whatever else the machine runs weighs on every configuration alike.

    python benchmarks/cpu_threads.py [--threads 1,2] [--rounds 3] [--num-requests 16]

Writes benchmarks/results/cpu-threads-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common import add_run_args, fixed_length, machine_description, output_path

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.demo import demo_model_path

CONDITIONS = ("no spinner", "beside a spinner")
SPINNER = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def spinner(core: int, limit_s: float) -> Iterator[None]:
    """A process spinning on `core` for the duration of the block (at most `limit_s`)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SPINNER.format(limit=limit_s)],
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    try:
        time.sleep(0.2)  # let it start spinning before anything is timed
        yield
    finally:
        process.kill()
        process.wait()


def tokens_per_second(model: str, threads: int, args: argparse.Namespace) -> float:
    """One timed LLM.generate of the workload in an engine with `threads` CPU threads."""
    llm = LLM(model, dtype="float32", device="cpu", cpu_threads=threads,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    vocab_size = llm.engine.hf_config.vocab_size
    requests = fixed_length(args.num_requests, args.input_len, args.output_len, vocab_size,
                            args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([[1, 5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)  # first-call costs
    started = time.perf_counter()
    llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
    return args.num_requests * args.output_len / (time.perf_counter() - started)


def run(args: argparse.Namespace, model: str) -> dict[str, dict[str, list[float]]]:
    """tokens/s per condition per thread count, one figure per round."""
    results: dict[str, dict[str, list[float]]] = {
        condition: {str(threads): [] for threads in args.threads} for condition in CONDITIONS
    }
    for round_index in range(args.rounds):
        # Alternate the order, so neither thread count always runs first after a condition change.
        order = args.threads if round_index % 2 == 0 else args.threads[::-1]
        for condition in CONDITIONS:
            for threads in order:
                if condition == "no spinner":
                    rate = tokens_per_second(model, threads, args)
                else:
                    with spinner(args.spin_core, args.spin_limit_s):
                        rate = tokens_per_second(model, threads, args)
                results[condition][str(threads)].append(rate)
                print(f"round {round_index + 1}: {condition}, {threads} threads: "
                      f"{rate:.0f} tokens/s", flush=True)
    return results


def int_list(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--threads", type=int_list, default=[1, 2],
                        help="CPU thread counts to compare, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every configuration")
    parser.add_argument("--num-requests", type=int, default=16, help="requests per run")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=96, help="tokens each generates")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=256 * 2**20,
                        help="KV budget of each engine")
    parser.add_argument("--spin-core", type=int, default=0, help="the core the spinner takes")
    parser.add_argument("--spin-limit-s", type=float, default=600.0,
                        help="the spinner ends after this long whatever happens")
    add_run_args(parser, quick="one round of a few short requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.num_requests, args.input_len, args.output_len = 1, 4, 16, 16
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = args.model or str(demo_model_path())
    load_before = os.getloadavg()
    results = run(args, model)
    medians = {condition: {threads: statistics.median(rates) for threads, rates in runs.items()}
               for condition, runs in results.items()}
    result = {
        "benchmark": "offline tokens/s per CPU thread count, without and beside a spinning process",
        "machine": machine_description() | {"usable_cores": sorted(os.sched_getaffinity(0))},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "model": args.model or "pagoda demo model",
        "notes": args.notes,
        "tokens_per_s": results,
        "median_tokens_per_s": medians,
        "settings": vars(args),
    }
    output = output_path(args.output, "cpu-threads-cpu.json", args.quick)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(medians, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
