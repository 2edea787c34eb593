"""Offline throughput of two checkouts of Pagoda on the same workload, in alternating rounds.

For "no slowdown" checks of a change: each round runs `LLM.generate` on the ShareGPT-like mix
once with the before interpreter and once with the after one (each a Python environment where
`pagoda` is installed from one checkout), in alternating order, each in a fresh process. The
ratio of each round cancels the drift of a shared machine's load within the round; the median
over rounds is the result.

    python benchmarks/compare_checkouts.py --before /venv-a/bin/python --after /venv-b/bin/python \\
        [--rounds 3] [--num-requests 100] [--length-scale 0.5] [--notes TEXT]

Writes benchmarks/results/compare-checkouts-cpu.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine_description, output_path

# Runs inside each interpreter; the checkout's own benchmarks/common.py builds the workload.
WORKER = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
from common import sharegpt_like
from pagoda.backend import LLM, SamplingParams
llm = LLM(enable_prefix_caching=False)
requests = sharegpt_like({num_requests}, llm.engine.hf_config.vocab_size,
                         llm.engine.max_model_len, 0, {length_scale})
params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
          for r in requests]
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)  # untimed warm-up
started = time.perf_counter()
llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds,
                  "tokens_per_s": sum(r.output_len for r in requests) / seconds}}))
"""


def run_side(python: str, args: argparse.Namespace) -> dict:
    code = WORKER.format(benchmarks=str(Path(__file__).parent), num_requests=args.num_requests,
                         length_scale=args.length_scale)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="Python of the before checkout")
    parser.add_argument("--after", default=sys.executable, help="Python of the after checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--length-scale", type=float, default=0.5)
    parser.add_argument("--notes", default="", help="free text stored in the result")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    rounds = []
    for index in range(args.rounds):
        order = ("before", "after") if index % 2 == 0 else ("after", "before")
        result = {side: run_side(getattr(args, side), args) for side in order}
        result["ratio"] = result["after"]["tokens_per_s"] / result["before"]["tokens_per_s"]
        rounds.append(result)
        print(f"round {index + 1}: before {result['before']['tokens_per_s']:.0f} tok/s, "
              f"after {result['after']['tokens_per_s']:.0f} tok/s, ratio {result['ratio']:.3f}")
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"median after/before: {median:.3f}")
    path = output_path(args.output, "compare-checkouts-cpu.json", quick=False)
    path.write_text(json.dumps({
        "benchmark": "offline throughput, two checkouts alternating",
        "machine": machine_description(), "notes": args.notes,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "rounds": rounds, "median_ratio": median,
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
