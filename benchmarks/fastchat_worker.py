"""Behind FastChat's controller: `pagoda worker` against FastChat's stock
`fastchat.serve.model_worker` (transformers backend, float32 on CPU, in its own environment with
transformers<5) on the same model folder, in one run.

Both workers register with one FastChat controller under different names and stay up for the
whole run. Every request takes the path FastChat's OpenAI API server takes: ask the controller
`/get_worker_address`, then stream `/worker_generate_stream` from that worker (greedy, echo off,
fixed `max_new_tokens`; FastChat's worker always stops at EOS, so both may stop early and the
generated tokens are reported next to the request rates).

1. Closed loop (issue 5): `--concurrency` clients (32) send `--num-requests` requests each round;
   requests/s, output tokens/s, p50/p99 latency. Rounds alternate between the workers.
2. Poisson sweep (issue 7's serving target, unless `--no-poisson`): arrivals at each worker's
   rates for `--duration-s`; the sustainable rate is the highest whose p99 TTFT stays under
   `--ttft-threshold-s` with every request complete.

    python benchmarks/fastchat_worker.py [--model DIR] [--concurrency 32] [--num-requests 128]

Writes benchmarks/results/fastchat-worker-cpu.json and fastchat-worker-cpu.png. The first run
builds FastChat's environment under $PAGODA_CACHE_DIR/bench-venvs (a few minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, machine_description, sharegpt_like
from loadgen import closed_loop, fastchat_worker_client, poisson, summarize
from processes import FASTCHAT_REQUIREMENTS, bench_venv, start_controller, start_worker
from serving import sustainable_rate

from pagoda.backend.demo import demo_model_path

logger = logging.getLogger("fastchat_worker")

WORKER_NAMES = {"fastchat model_worker": "vicuna-fastchat", "pagoda worker": "vicuna-pagoda"}
COLORS = {"fastchat model_worker": "tab:grey", "pagoda worker": "tab:blue"}


def text_prompts(model_dir: Path, num_prompts: int, length_scale: float, seed: int) -> list[str]:
    """ShareGPT-like prompt lengths; random token ids decoded to text (workers take text)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    requests = sharegpt_like(num_prompts, config.vocab_size, config.max_position_embeddings // 2,
                             seed, length_scale)
    return [tokenizer.decode(r.prompt_token_ids[1:]) for r in requests]


def closed_loop_rounds(controller_url: str, prompts: list[str], args: argparse.Namespace) -> dict:
    rounds: dict[str, list[dict]] = {name: [] for name in WORKER_NAMES}
    for system, model_name in WORKER_NAMES.items():  # warm-up, untimed: first forwards are slow
        send = fastchat_worker_client(controller_url, model_name, prompts, args.max_new_tokens)
        asyncio.run(closed_loop(send, args.warmup_requests, args.warmup_requests,
                                f"{system} warm-up"))
    for round_index in range(args.rounds):
        for system, model_name in WORKER_NAMES.items():
            send = fastchat_worker_client(controller_url, model_name, prompts,
                                          args.max_new_tokens)
            results, elapsed = asyncio.run(closed_loop(
                send, len(prompts), args.concurrency, f"{system} round {round_index + 1}"))
            summary = summarize(results, elapsed)
            logger.info("%s round %d: %.2f req/s, %.0f tok/s, latency p50 %.2f p99 %.2f s",
                        system, round_index + 1, summary["requests_per_s"],
                        summary["output_tokens_per_s"], summary["e2e_s"]["p50"] or float("nan"),
                        summary["e2e_s"]["p99"] or float("nan"))
            rounds[system].append(summary)
    out: dict[str, dict] = {}
    for system, summaries in rounds.items():
        out[system] = {
            "median_requests_per_s": statistics.median(s["requests_per_s"] for s in summaries),
            "median_output_tokens_per_s": statistics.median(
                s["output_tokens_per_s"] for s in summaries),
            "rounds": summaries,
        }
    pagoda, fastchat = out["pagoda worker"], out["fastchat model_worker"]
    out["pagoda_requests_per_s_ratio"] = (pagoda["median_requests_per_s"]
                                          / fastchat["median_requests_per_s"])
    return out


def poisson_sweeps(controller_url: str, prompts: list[str], args: argparse.Namespace) -> dict:
    rates = {"fastchat model_worker": [float(r) for r in args.fastchat_rates.split(",")],
             "pagoda worker": [float(r) for r in args.pagoda_rates.split(",")]}
    out: dict[str, dict] = {}
    for system, model_name in WORKER_NAMES.items():
        sweep = []
        for rate_index, rate in enumerate(rates[system]):
            num_requests = max(1, round(rate * args.duration_s))
            send = fastchat_worker_client(controller_url, model_name, prompts[:num_requests],
                                          args.max_new_tokens)
            results, elapsed = asyncio.run(poisson(
                send, num_requests, rate, args.seed + rate_index, args.duration_s + args.drain_s,
                f"{system} {rate:g} req/s"))
            point = {"rate": rate, **summarize(results, elapsed)}
            logger.info("%s rate %g: %d/%d done, TTFT p99 %.3f s", system, rate,
                        point["completed"], num_requests, point["ttft_s"]["p99"] or float("nan"))
            sweep.append(point)
            if point["completed"] < num_requests:
                break  # NOTE: higher rates only overload it further.
        out[system] = {"sweep": sweep,
                       "sustainable_rate": sustainable_rate(sweep, args.ttft_threshold_s)}
    pagoda = out["pagoda worker"]["sustainable_rate"]
    fastchat = out["fastchat model_worker"]["sustainable_rate"]
    out["pagoda_sustainable_rate_ratio"] = pagoda / fastchat if pagoda and fastchat else None
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = result["closed_loop"]
    systems = list(WORKER_NAMES)
    panels = 3 if result.get("poisson") else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes[0].bar(systems, [closed[s]["median_requests_per_s"] for s in systems],
                color=[COLORS[s] for s in systems])
    axes[0].set_title(f"requests/s at concurrency {result['concurrency']} (median of rounds)")
    width = 0.35
    positions = np.arange(2)
    for offset, quantile in ((-width / 2, "p50"), (width / 2, "p99")):
        axes[1].bar(positions + offset,
                    [closed[s]["rounds"][-1]["e2e_s"][quantile] for s in systems], width,
                    label=quantile)
    axes[1].set_xticks(positions, systems)
    axes[1].set_yscale("log")
    axes[1].set_title("request latency (s), last round")
    axes[1].legend()
    if result.get("poisson"):
        for system in systems:
            sweep = result["poisson"][system]["sweep"]
            axes[2].plot([p["rate"] for p in sweep], [p["ttft_s"]["p99"] for p in sweep], "o-",
                         label=system, color=COLORS[system])
        axes[2].axhline(result["ttft_threshold_s"], color="grey", linestyle=":",
                        label="threshold")
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log")
        axes[2].set_xlabel("request rate (req/s, Poisson)")
        axes[2].set_title("p99 TTFT (s)")
        axes[2].legend(fontsize=8)
    for axis in axes:
        axis.grid(alpha=0.3)
    machine = result["machine"]
    figure.suptitle(f"Behind FastChat's controller, max_new_tokens {result['max_new_tokens']} - "
                    f"{machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=128, help="requests per round")
    parser.add_argument("--rounds", type=int, default=2, help="closed-loop rounds per worker")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=8,
                        help="untimed requests per worker before the closed-loop rounds")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="prompt lengths: ShareGPT's mean (161 tokens) times this")
    parser.add_argument("--no-poisson", action="store_true", help="skip the Poisson sweeps")
    # NOTE: both grids step by the same factor (1.25), so neither worker's sustainable rate is
    # read off a coarser grid than the other's.
    parser.add_argument("--fastchat-rates", default="0.64,0.8,1,1.25,1.6,2,2.5")
    parser.add_argument("--pagoda-rates", default="6.4,8,10,12.5,16,20,25,32")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--drain-s", type=float, default=20.0)
    parser.add_argument("--ttft-threshold-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--notes", default=None,
                        help="recorded in the results: what else ran on the machine, and so on")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else demo_model_path()
    fastchat_python = bench_venv("fastchat-worker", FASTCHAT_REQUIREMENTS)
    num_prompts = max(args.num_requests, int(max(
        float(r) for r in args.pagoda_rates.split(",")) * args.duration_s) + 1)
    prompts = text_prompts(model_dir, num_prompts, args.length_scale, args.seed)
    with tempfile.TemporaryDirectory(prefix="pagoda-fastchat-bench-") as workdir, \
            contextlib.ExitStack() as stack:
        controller, controller_url = start_controller(fastchat_python, Path(workdir))
        stack.callback(controller.stop)
        workers = {}
        for kind, system in (("fastchat", "fastchat model_worker"), ("pagoda", "pagoda worker")):
            workers[system] = start_worker(kind, fastchat_python, Path(workdir), model_dir,
                                           WORKER_NAMES[system], controller_url)
            stack.callback(workers[system].stop)
        closed = closed_loop_rounds(controller_url, prompts[:args.num_requests], args)
        sweeps = None if args.no_poisson else poisson_sweeps(controller_url, prompts, args)
        peak_rss_mib = {system: worker.peak_rss_mib() for system, worker in workers.items()}

    result = {
        "benchmark": "FastChat controller: pagoda worker vs fastchat.serve.model_worker",
        "machine": machine_description(),
        "fastchat_environment": FASTCHAT_REQUIREMENTS,
        "model": str(model_dir) if args.model else "pagoda demo model",
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "ttft_threshold_s": args.ttft_threshold_s,
        "closed_loop": closed,
        "peak_rss_mib": peak_rss_mib,
        "poisson": sweeps,
        "settings": vars(args),
        "notes": args.notes,
    }
    output = Path(args.output) if args.output else RESULTS_DIR / "fastchat-worker-cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_suffix(".png"))
    print(json.dumps({"closed_loop_requests_per_s_ratio": closed["pagoda_requests_per_s_ratio"],
                      "sustainable_rate_ratio": (sweeps or {}).get(
                          "pagoda_sustainable_rate_ratio")}))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
