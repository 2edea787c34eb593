"""Replicas behind a router: a multi-tenant shared-prefix workload sent through sglang-router (or
vllm-router) to two `pagoda serve` replicas, its cache_aware policy against round_robin in the
same run.

Each tenant has its own long system prompt (random vocabulary words, `--prompt-tokens`); each
request is one tenant's (seeded draw) with a short distinct user turn, a streamed chat completion
of `--output-tokens`. Each replica's KV cache (`--num-kv-blocks`) holds only some tenants'
prompts, so where the router sends a request decides whether its prompt is found cached.

Every run starts a router with one policy over the same replicas, empties both prefix caches
(POST /flush_cache) and sends the same seeded Poisson arrivals. The prefix-cache hit rate is
summed over the replicas (their /metrics counters, in blocks); TTFT is timed by the client,
through the router; requests per replica come from the replicas' counters. Policies alternate
in A-B-B-A order over `--rounds` rounds, so a neighbour's load drifting on a shared machine
weighs on both alike. The ceiling is the hit rate if each tenant's prompt were computed once
(and no request preempted: a resumed request looks its own blocks up again).

    python benchmarks/routing.py [--router sglang] [--tenants 4] [--rounds 2]

Needs the router package (pip install -e '.[router]'). Writes benchmarks/results/routing-cpu.json
and routing-cpu.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from common import add_run_args, machine_description, output_path
from loadgen import openai_chat_client, poisson, summarize
from processes import ROUTER_MODULES, router_installed, start_replicas, start_router
from serving import prefix_cache_counters, random_text, system_prompt_text, vocabulary_words
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagoda.backend.demo import demo_model_path
from pagoda.backend.prompt import encode_prompt

logger = logging.getLogger("routing")

MODEL = "bench"
POLICIES = ("cache_aware", "round_robin")
USER_TURN_WORDS = (8, 24)
SUCCESS = 'pagoda_requests_total{outcome="success"}'
PREEMPTIONS = "pagoda_num_preemptions_total"


@dataclass(slots=True)
class Workload:
    model: str  # the replicas' served model name
    conversations: list[list[dict[str, str]]]
    tenant_of: list[int]  # the tenant of each request
    output_tokens: int


def build_workload(tokenizer: PreTrainedTokenizerBase, model: str,
                   args: argparse.Namespace) -> Workload:
    rng = np.random.default_rng(args.seed)
    words = vocabulary_words(tokenizer)
    prompts = [system_prompt_text(tokenizer, words, rng, args.prompt_tokens)
               for _ in range(args.tenants)]
    tenant_of = rng.integers(0, args.tenants, args.num_requests).tolist()
    conversations = [
        [{"role": "system", "content": prompts[tenant]},
         {"role": "user", "content": random_text(rng, words, int(rng.integers(*USER_TURN_WORDS)))}]
        for tenant in tenant_of]
    return Workload(model, conversations, tenant_of, args.output_tokens)


def ceiling_hit_rate(workload: Workload, tokenizer: PreTrainedTokenizerBase,
                     block_size: int) -> float:
    """The hit rate if each tenant's prompt prefix were computed once and found ever after, with
    no preemption: per request, the blocks the engine looks up ((prompt - 1) // block_size, as it
    counts them) and, after a tenant's first request, those its tenant's common prefix fills."""
    token_ids = [encode_prompt(tokenizer, tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=False))
        for conversation in workload.conversations]
    common: dict[int, list[int]] = {}
    for tenant, ids in zip(workload.tenant_of, token_ids):
        shared = common.get(tenant, ids)
        length = next((i for i, (a, b) in enumerate(zip(shared, ids)) if a != b),
                      min(len(shared), len(ids)))
        common[tenant] = shared[:length]
    queries = hits = 0
    seen: set[int] = set()
    for tenant, ids in zip(workload.tenant_of, token_ids):
        lookups = (len(ids) - 1) // block_size
        queries += lookups
        if tenant in seen:
            hits += min(len(common[tenant]) // block_size, lookups)
        seen.add(tenant)
    return hits / queries


def counter(url: str, name: str) -> float:
    """A sample of the replica's /metrics, by its name with labels."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise KeyError(name)


def run_policy(policy: str, run_index: int, workload: Workload, replica_urls: list[str],
               args: argparse.Namespace, workdir: Path) -> dict:
    """One run: a fresh router with `policy`, cold caches, the workload's Poisson arrivals."""
    router, router_url = start_router(args.router, workdir, replica_urls, policy, quiet=True)
    try:
        for url in replica_urls:  # a cold start for every run: no policy inherits a cache
            httpx.post(f"{url}/flush_cache", timeout=30).raise_for_status()
        counters = [prefix_cache_counters(url) for url in replica_urls]
        served = [counter(url, SUCCESS) for url in replica_urls]
        preempted = sum(counter(url, PREEMPTIONS) for url in replica_urls)
        send = openai_chat_client(router_url, workload.model, workload.conversations,
                                  [workload.output_tokens] * len(workload.conversations))
        results, elapsed = asyncio.run(poisson(
            send, len(workload.conversations), args.rate, args.seed,
            deadline_s=len(workload.conversations) / args.rate + args.drain_s,
            desc=f"{policy} run {run_index}"))
    finally:
        router.stop()
    queries = hits = 0.0
    for url, (queries_before, hits_before) in zip(replica_urls, counters):
        queries_after, hits_after = prefix_cache_counters(url)
        queries += queries_after - queries_before
        hits += hits_after - hits_before
    point = {"policy": policy, "run": run_index, **summarize(results, elapsed),
             "prefix_cache_queries": queries, "prefix_cache_hits": hits,
             "prefix_cache_hit_rate": hits / queries if queries else None,
             "requests_per_replica": [counter(url, SUCCESS) - before
                                      for url, before in zip(replica_urls, served)],
             # A preempted request is looked up again when it resumes (mostly hits: its own
             # blocks), which can lift a run above the ceiling.
             "preemptions": sum(counter(url, PREEMPTIONS) for url in replica_urls) - preempted}
    logger.info("%s run %d: hit rate %.2f, TTFT p50 %.3f s p90 %.3f s, per replica %s", policy,
                run_index, point["prefix_cache_hit_rate"] or 0.0, point["ttft_s"]["p50"] or 0.0,
                point["ttft_s"]["p90"] or 0.0, point["requests_per_replica"])
    return point


def policy_order(rounds: int) -> list[str]:
    """A-B-B-A-...: each policy as often first as second."""
    order: list[str] = []
    for index in range(rounds):
        order += list(POLICIES) if index % 2 == 0 else list(reversed(POLICIES))
    return order


def pooled(runs: list[dict]) -> dict:
    """One policy's runs together: hit rate over all their lookups, latencies over all requests
    (each run's own TTFT percentiles are kept in `runs`)."""
    queries = sum(run["prefix_cache_queries"] for run in runs)
    hits = sum(run["prefix_cache_hits"] for run in runs)
    ttft_p50 = [run["ttft_s"]["p50"] for run in runs]
    return {
        "num_requests": sum(run["num_requests"] for run in runs),
        "completed": sum(run["completed"] for run in runs),
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "hit_rate_per_run": [run["prefix_cache_hit_rate"] for run in runs],
        "ttft_s": {quantile: float(np.mean([run["ttft_s"][quantile] for run in runs]))
                   for quantile in ("mean", "p50", "p90", "p99")},
        "ttft_p50_per_run": ttft_p50,
        "e2e_s_mean": float(np.mean([run["e2e_s"]["mean"] for run in runs])),
        "requests_per_replica": np.sum([run["requests_per_replica"] for run in runs],
                                       axis=0).tolist(),
        "preemptions": sum(run["preemptions"] for run in runs),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(result["policies"])
    colors = {"cache_aware": "tab:blue", "round_robin": "tab:grey"}
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    rates = [result["policies"][p]["prefix_cache_hit_rate"] for p in policies]
    bars = axes[0].bar(policies, rates, color=[colors.get(p, "tab:olive") for p in policies])
    axes[0].bar_label(bars, [f"{rate:.2f}" for rate in rates], label_type="center")
    for index, policy in enumerate(policies):
        runs = result["policies"][policy]["hit_rate_per_run"]
        axes[0].plot([index] * len(runs), runs, "k.", label="runs" if index == 0 else None)
    axes[0].axhline(result["ceiling_hit_rate"], color="tab:green", linestyle=":",
                    label=f"ceiling {result['ceiling_hit_rate']:.2f}")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("prefix-cache hit rate, both replicas")
    axes[0].legend(fontsize=8)
    width = 0.35
    for offset, quantile in ((-width / 2, "p50"), (width / 2, "p90")):
        values = [result["policies"][p]["ttft_s"][quantile] for p in policies]
        bars = axes[1].bar(np.arange(len(policies)) + offset, values, width, label=quantile)
        axes[1].bar_label(bars, [f"{v:.2f}" for v in values], fontsize=8)
    axes[1].set_xticks(range(len(policies)), policies)
    axes[1].set_title("TTFT through the router (s, mean of runs)")
    axes[1].legend(fontsize=8)
    num_replicas = len(result["policies"][policies[0]]["requests_per_replica"])
    for replica in range(num_replicas):
        counts = [result["policies"][p]["requests_per_replica"][replica] for p in policies]
        axes[2].bar(np.arange(len(policies)) + (replica - 0.5) * width, counts, width,
                    label=f"replica {replica + 1}")
    axes[2].set_xticks(range(len(policies)), policies)
    axes[2].set_title("requests served per replica")
    axes[2].legend(fontsize=8)
    for axis in axes:
        axis.grid(axis="y", alpha=0.3)
    machine = result["machine"]
    figure.suptitle(
        f"{result['tenants']} tenants x {result['prompt_tokens']}-token system prompts, "
        f"{result['router']}, 2 replicas x {result['num_kv_blocks']} KV blocks - "
        f"{machine['cpu']}, {machine['cores']} cores shared with other jobs (not quiet)",
        fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--router", choices=sorted(ROUTER_MODULES), default="sglang")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=420,
                        help="tokens of each tenant's system prompt")
    parser.add_argument("--num-requests", type=int, default=48, help="requests per run")
    parser.add_argument("--rate", type=float, default=3.0, help="requests/s (Poisson)")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=64, help="per replica")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each policy (alternating A-B-B-A)")
    parser.add_argument("--drain-s", type=float, default=60.0,
                        help="seconds after the last arrival before a run's unfinished "
                             "requests are cancelled")
    parser.add_argument("--replica-urls", nargs="+", default=None,
                        help="use these running replicas (of --model) instead of starting "
                             "two")
    add_run_args(parser, quick="2 tenants, short prompts, 8 requests, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.tenants, args.prompt_tokens, args.num_requests = 2, 96, 8
        args.rate, args.output_tokens, args.rounds, args.drain_s = 4.0, 4, 1, 30.0
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    if not router_installed(args.router):
        raise SystemExit(f"{args.router}-router is not installed: pip install -e '.[router]'")
    model_dir = Path(args.model) if args.model else demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pagoda-routing-") as workdir:
        replicas = []
        if args.replica_urls is None:
            # One torch thread each: two replicas on a 2-core machine.
            replicas = start_replicas(
                Path(workdir), model_dir, 2, "--served-model-name", MODEL, "--num-kv-blocks",
                str(args.num_kv_blocks), "--cpu-threads", "1")
        replica_urls = args.replica_urls or [url for _, url in replicas]
        try:
            info = httpx.get(f"{replica_urls[0]}/server_info", timeout=10).json()
            workload = build_workload(tokenizer, info["served_model_name"], args)
            for index, policy in enumerate(policy_order(args.rounds)):
                runs.append(run_policy(policy, index, workload, replica_urls, args,
                                       Path(workdir)))
        finally:
            for process, _ in replicas:
                process.stop()

    result = {
        "benchmark": "replicas behind a router: multi-tenant shared prefixes, streamed chat",
        "router": f"{args.router}-router",
        "machine": machine_description(),
        # Not a quiet machine: other jobs share its cores (the load averages around the run).
        "quiet": False,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "model": str(model_dir) if args.model else "pagoda demo model",
        "notes": args.notes,
        "tenants": args.tenants,
        "prompt_tokens": args.prompt_tokens,
        "num_kv_blocks": info["num_kv_blocks"],
        "block_size": info["block_size"],
        "ceiling_hit_rate": ceiling_hit_rate(workload, tokenizer, info["block_size"]),
        "policies": {policy: pooled([run for run in runs if run["policy"] == policy])
                     for policy in POLICIES},
        "runs": runs,
        "settings": vars(args),
    }
    output = output_path(args.output, "routing-cpu.json", args.quick)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_suffix(".png"))
    print(json.dumps({policy: {"hit_rate": stats["prefix_cache_hit_rate"],
                               "ttft_p50_s": stats["ttft_s"]["p50"]}
                      for policy, stats in result["policies"].items()}))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
