"""Online serving: Poisson arrivals at a sweep of request rates against `pagoda serve` (OpenAI
API, /v1/completions, streaming), replaying a seeded ShareGPT-like workload.

Each rate gets a fresh seeded workload of rate x duration requests (token-id prompts, greedy,
`ignore_eos`, exactly each request's output length), sent at the arrivals of a Poisson process;
requests unfinished `--drain-s` seconds after the last arrival are cancelled and count as
incomplete (their TTFT enters the percentiles at its lower bound). Reports throughput, TTFT, time
per output token (TPOT), inter-token latency (ITL) and end-to-end latency (mean, p50, p90, p99),
and the sustainable rate: the highest rate of the sweep whose p99 TTFT stays under
`--ttft-threshold-s` with every request complete.

    python benchmarks/serving.py [--model DIR] [--rates 1,2,4,8,16] [--duration-s 30]

Writes benchmarks/results/serving-cpu.json and serving-cpu.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, machine_description, sharegpt_like
from loadgen import openai_completion_client, poisson, summarize
from processes import start_pagoda_serve

from pagoda.backend.demo import demo_model_path

logger = logging.getLogger("serving")


def sustainable_rate(sweep: list[dict], threshold_s: float) -> float | None:
    """Highest swept rate with p99 TTFT under the threshold and nothing left incomplete."""
    good = [point["rate"] for point in sweep
            if point["completed"] == point["num_requests"]
            and point["ttft_s"]["p99"] is not None and point["ttft_s"]["p99"] < threshold_s]
    return max(good) if good else None


def run_sweep(base_url: str, model: str, rates: list[float], duration_s: float, drain_s: float,
              vocab_size: int, max_model_len: int, length_scale: float, seed: int) -> list[dict]:
    sweep = []
    for rate_index, rate in enumerate(rates):
        num_requests = max(1, round(rate * duration_s))
        requests = sharegpt_like(num_requests, vocab_size, max_model_len, seed + rate_index,
                                 length_scale)
        send = openai_completion_client(base_url, model, [r.prompt_token_ids for r in requests],
                                        [r.output_len for r in requests])
        results, elapsed = asyncio.run(poisson(send, num_requests, rate, seed + rate_index,
                                               duration_s + drain_s, f"{rate:g} req/s"))
        point = {"rate": rate, **summarize(results, elapsed)}
        logger.info("rate %g: %d/%d done, %.2f req/s, %.0f tok/s, TTFT p50 %.3f p99 %.3f s",
                    rate, point["completed"], num_requests, point["requests_per_s"],
                    point["output_tokens_per_s"], point["ttft_s"]["p50"] or float("nan"),
                    point["ttft_s"]["p99"] or float("nan"))
        sweep.append(point)
    return sweep


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, series in result["systems"].items():
        sweep = series["sweep"]
        rates = [p["rate"] for p in sweep]
        axes[0].plot(rates, [p["output_tokens_per_s"] for p in sweep], "o-", label=name)
        for quantile, style in (("p50", "o--"), ("p99", "o-")):
            axes[1].plot(rates, [p["ttft_s"][quantile] for p in sweep], style,
                         label=f"{name} {quantile}")
            axes[2].plot(rates, [p["tpot_s"][quantile] for p in sweep], style,
                         label=f"{name} {quantile}")
    axes[1].axhline(result["ttft_threshold_s"], color="grey", linestyle=":", label="threshold")
    for axis, title in zip(axes, ("output tokens/s", "TTFT (s)", "time per output token (s)")):
        axis.set_xlabel("request rate (req/s, Poisson)")
        axis.set_title(title)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[1].set_yscale("log")
    machine = result["machine"]
    figure.suptitle(f"Serving, ShareGPT-like x{result['length_scale']} - {machine['cpu']}, "
                    f"{machine['cores']} cores, GPU {machine['gpu']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--rates", default="1,2,4,8,16", help="request rates, comma-separated")
    parser.add_argument("--duration-s", type=float, default=30.0,
                        help="seconds of arrivals per rate")
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="seconds after the last arrival before unfinished requests are "
                             "cancelled")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="multiply ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--ttft-threshold-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("serve_flags", nargs="*",
                        help="after --: extra flags for pagoda serve (engine flags)")
    args = parser.parse_args()

    from transformers import AutoConfig

    model_dir = Path(args.model) if args.model else demo_model_path()
    hf_config = AutoConfig.from_pretrained(model_dir)
    max_model_len = hf_config.max_position_embeddings
    rates = [float(rate) for rate in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="pagoda-serving-") as workdir:
        server, url = start_pagoda_serve(Path(workdir), model_dir, "--served-model-name",
                                         "bench", *args.serve_flags)
        try:
            sweep = run_sweep(url, "bench", rates, args.duration_s, args.drain_s,
                              hf_config.vocab_size, max_model_len, args.length_scale, args.seed)
            peak_rss_mib = server.peak_rss_mib()
        finally:
            server.stop()

    sample = sharegpt_like(200, hf_config.vocab_size, max_model_len, args.seed, args.length_scale)
    result = {
        "benchmark": "online serving, Poisson arrivals, OpenAI /v1/completions streaming",
        "machine": machine_description(),
        "model": str(model_dir) if args.model else "pagoda demo model",
        "length_scale": args.length_scale,
        "mean_prompt_tokens": float(np.mean([len(r.prompt_token_ids) for r in sample])),
        "mean_output_tokens": float(np.mean([r.output_len for r in sample])),
        "ttft_threshold_s": args.ttft_threshold_s,
        "systems": {"pagoda serve": {
            "sweep": sweep,
            "peak_rss_mib": peak_rss_mib,
            "sustainable_rate": sustainable_rate(sweep, args.ttft_threshold_s)}},
        "settings": vars(args),
    }
    output = Path(args.output) if args.output else RESULTS_DIR / "serving-cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_suffix(".png"))
    print(json.dumps({"sustainable_rate": result["systems"]["pagoda serve"]["sustainable_rate"],
                      "threshold_s": args.ttft_threshold_s}))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
