"""Structured outputs' cost: decode throughput of the same batch with a JSON schema and without,
in one run, on one engine.

Both passes run the same prompts greedily to exactly max_tokens: the unconstrained one ignores
EOS, and the schema's one string field must be longer than max_tokens can write, so the grammar
never lets it end early. Every constrained step therefore fills and applies a bitmask for every
sequence. Passes alternate for `--rounds` rounds. On a shared machine other jobs slow either
pass at random (tenfold, at times), so three estimates are kept: the ratio of each kind's
fastest pass (the least disturbed; the headline), and the medians of the per-round ratios by
wall time and by the process's CPU time. The schema is compiled once, before the timed rounds
(its compile time is reported on its own).

    pagoda bench structured [--model DIR] [--num-requests 32] [--max-tokens 96]
                            [--backend xgrammar|guidance] [--rounds 9] [--quick]

Writes benchmarks/results/structured-<backend>-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from common import machine_description, output_path, random_prompt

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.structured import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "string", "minLength": 100_000}},
    "required": ["notes"],
    "additionalProperties": False,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backend", default="xgrammar", choices=["xgrammar", "guidance"])
    parser.add_argument("--quick", action="store_true", help="a few requests, one round")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.num_requests, args.max_tokens, args.rounds = 8, 32, 1
    return args


def timed_pass(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    assert tokens == len(prompts) * params.max_tokens, "every request runs to max_tokens"
    return {"seconds": elapsed, "cpu_seconds": cpu, "tokens": tokens,
            "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    llm = LLM(args.model, structured_outputs_backend=args.backend)
    vocab_size = llm.engine.hf_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, args.prompt_len, vocab_size) for _ in range(args.num_requests)]
    spec = StructuredOutputsParams(json=SCHEMA)
    started = time.perf_counter()
    llm.engine.structured.compile(spec)
    compile_seconds = time.perf_counter() - started
    free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                 structured_outputs=spec)
    timed_pass(llm, prompts[:2], free)  # warm-up: first-call allocations, lazy imports
    rounds = []
    for _ in range(args.rounds):
        unconstrained_pass = timed_pass(llm, prompts, free)
        schema_pass = timed_pass(llm, prompts, constrained)
        rounds.append({
            "unconstrained": unconstrained_pass,
            "json_schema": schema_pass,
            "ratio": schema_pass["tokens_per_s"] / unconstrained_pass["tokens_per_s"],
            "cpu_ratio": schema_pass["tokens_per_cpu_s"] / unconstrained_pass["tokens_per_cpu_s"],
        })
    llm.engine.check_no_leaks()
    result: dict[str, object] = {
        "benchmark": "decode throughput with a JSON schema vs unconstrained, same engine and run",
        "machine": machine_description(),
        "note": "a shared machine (2 cores, other engineers' builds and tests running): wall "
                "times drift at random, so the headline is the ratio of each kind's fastest "
                "pass; the medians of per-round ratios are kept beside it",
        "model": args.model or "pagoda demo model",
        "backend": args.backend,
        "schema": SCHEMA,
        "schema_compile_ms": 1000 * compile_seconds,
        "best_ratio": _fastest(rounds, "json_schema") / _fastest(rounds, "unconstrained"),
        "best_tokens_per_s": {kind: _fastest(rounds, kind)
                              for kind in ("unconstrained", "json_schema")},
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in rounds),
        "median_tokens_per_s": {
            kind: statistics.median(r[kind]["tokens_per_s"] for r in rounds)
            for kind in ("unconstrained", "json_schema")
        },
        "rounds": rounds,
        "settings": vars(args),
    }
    path = output_path(args.output, f"structured-{args.backend}-cpu.json", args.quick)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    summary = ("backend", "best_ratio", "best_tokens_per_s", "median_ratio", "median_cpu_ratio",
               "schema_compile_ms")
    print(json.dumps({key: result[key] for key in summary}, indent=2))
    return result


def _fastest(rounds: list[dict], kind: str) -> float:
    return max(r[kind]["tokens_per_s"] for r in rounds)


if __name__ == "__main__":
    main()
