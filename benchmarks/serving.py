"""Online serving: Poisson arrivals at a sweep of request rates against `pagoda serve` (OpenAI
API, streaming), replaying a seeded workload:

- sharegpt: ShareGPT-like lengths, /v1/completions with token-id prompts, greedy;
- shared-prefix: chat with a long system prompt common to every request (`--system-prompt-tokens`
  of random vocabulary words) and a short distinct user turn, /v1/chat/completions, greedy; the
  prefix cache hit rate over each rate comes from the server's /metrics counters;
- parallel-sampling: the sharegpt requests with n=4, temperature 1, seeded;
- beam: the sharegpt requests with beam search, width 4 (`use_beam_search`, n=4). The server
  sends beams when they finish, so TTFT is the end-to-end latency and no per-token time exists.

Each rate gets a fresh seeded workload of rate x duration requests (`ignore_eos`, exactly each
request's output length per choice), sent at the arrivals of a Poisson process;
requests unfinished `--drain-s` seconds after the last arrival are cancelled and count as
incomplete (their TTFT enters the percentiles at its lower bound). Reports throughput, TTFT, time
per output token (TPOT), inter-token latency (ITL) and end-to-end latency (mean, p50, p90, p99),
and the sustainable rate: the highest rate of the sweep whose p99 TTFT stays under
`--ttft-threshold-s` with every request complete.

    python benchmarks/serving.py [--model DIR] [--rates 1,2,4,8,16] [--duration-s 30]
    python benchmarks/serving.py --workload shared-prefix --rates 1,2,4,8

Writes benchmarks/results/serving-cpu.json and serving-cpu.png for sharegpt,
serving-WORKLOAD-cpu.json and .png for the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

from dataclasses import dataclass

import httpx
import numpy as np
from common import add_run_args, machine_description, output_path, sharegpt_like
from loadgen import SendOne, openai_chat_client, openai_completion_client, poisson, summarize
from processes import start_pagoda_serve
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from pagoda.backend.demo import demo_model_path

logger = logging.getLogger("serving")

WORKLOAD_ENDPOINTS = {
    "sharegpt": "/v1/completions streaming",
    "shared-prefix": "/v1/chat/completions streaming, shared system prompt",
    "parallel-sampling": "/v1/completions streaming, n=4 sampling",
    "beam": "/v1/completions streaming, beam search width 4",
}
WORKLOADS = list(WORKLOAD_ENDPOINTS)
SAMPLES = 4  # n of parallel-sampling, width of beam
USER_TURN_WORDS = (16, 64)  # shared-prefix: short distinct user turns


def sustainable_rate(sweep: list[dict], threshold_s: float) -> float | None:
    """Highest swept rate with p99 TTFT under the threshold and nothing left incomplete."""
    good = [point["rate"] for point in sweep
            if point["completed"] == point["num_requests"]
            and point["ttft_s"]["p99"] is not None and point["ttft_s"]["p99"] < threshold_s]
    return max(good) if good else None


@dataclass(slots=True)
class SweepSettings:
    base_url: str
    model: str
    workload: str
    duration_s: float
    drain_s: float
    length_scale: float
    seed: int
    vocab_size: int
    max_model_len: int
    system_prompt: str  # shared-prefix only
    words: list[str]  # shared-prefix: what user turns are made of


def vocabulary_words(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The vocabulary's alphabetic tokens as words, so random text costs about a token a word."""
    words = {tokenizer.decode([token_id]).strip() for token_id in range(tokenizer.vocab_size)}
    return sorted(word for word in words if word.isalpha())


def random_text(rng: np.random.Generator, words: list[str], num_words: int) -> str:
    return " ".join(rng.choice(words, num_words))


def system_prompt_text(tokenizer: PreTrainedTokenizerBase, words: list[str],
                       rng: np.random.Generator, num_tokens: int) -> str:
    """About `num_tokens` tokens of random vocabulary words (a word may take several)."""
    ids = tokenizer.encode(random_text(rng, words, num_tokens), add_special_tokens=False)
    return tokenizer.decode(ids[:num_tokens])


def workload_client(settings: SweepSettings, num_requests: int, seed: int) -> SendOne:
    """The client of one rate's requests: `num_requests` of the workload, drawn from `seed`."""
    requests = sharegpt_like(num_requests, settings.vocab_size, settings.max_model_len, seed,
                             settings.length_scale)
    prompts = [r.prompt_token_ids for r in requests]
    output_lens = [r.output_len for r in requests]
    url, model = settings.base_url, settings.model
    if settings.workload == "shared-prefix":
        rng = np.random.default_rng(seed)
        conversations = [
            [{"role": "system", "content": settings.system_prompt},
             {"role": "user", "content": random_text(rng, settings.words,
                                                     int(rng.integers(*USER_TURN_WORDS)))}]
            for _ in requests]
        return openai_chat_client(url, model, conversations, output_lens)
    extra = {"sharegpt": None,
             "parallel-sampling": {"n": SAMPLES, "temperature": 1.0, "seed": seed},
             "beam": {"n": SAMPLES, "use_beam_search": True, "temperature": 0.0}}
    return openai_completion_client(url, model, prompts, output_lens, extra[settings.workload])


def prefix_cache_counters(base_url: str) -> tuple[float, float]:
    """The server's prefix cache (queries, hits) counters, in blocks, since it started."""
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
               for sample in family.samples}
    return (samples["pagoda_prefix_cache_queries_total"],
            samples["pagoda_prefix_cache_hits_total"])


def run_sweep(settings: SweepSettings, rates: list[float]) -> list[dict]:
    sweep = []
    for rate_index, rate in enumerate(tqdm(rates, desc=f"{settings.workload} rates")):
        num_requests = max(1, round(rate * settings.duration_s))
        send = workload_client(settings, num_requests, settings.seed + rate_index)
        queries_before, hits_before = prefix_cache_counters(settings.base_url)
        results, elapsed = asyncio.run(poisson(send, num_requests, rate,
                                               settings.seed + rate_index,
                                               settings.duration_s + settings.drain_s,
                                               f"{rate:g} req/s"))
        queries, hits = prefix_cache_counters(settings.base_url)
        point = {"rate": rate, **summarize(results, elapsed),
                 "prefix_cache_hit_rate": ((hits - hits_before) / (queries - queries_before)
                                           if queries > queries_before else None)}
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
    if result.get("workload") == "beam":  # its TPOT panel is empty
        axes[2].text(0.5, 0.5, "beams arrive whole: TTFT is end-to-end,\nno per-token time",
                     ha="center", va="center", transform=axes[2].transAxes)
    for axis, title in zip(axes, ("output tokens/s", "TTFT (s)", "time per output token (s)")):
        axis.set_xlabel("request rate (req/s, Poisson)")
        axis.set_title(title)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[1].set_yscale("log")
    machine = result["machine"]
    workload = result.get("workload", "sharegpt")  # results from before --workload have none
    figure.suptitle(f"Serving, {workload} workload, ShareGPT-like lengths "
                    f"x{result['length_scale']} - {machine['cpu']}, "
                    f"{machine['cores']} cores, GPU {machine['gpu']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--workload", choices=WORKLOADS, default="sharegpt")
    parser.add_argument("--rates", default="1,2,4,8,16", help="request rates, comma-separated")
    parser.add_argument("--duration-s", type=float, default=30.0,
                        help="seconds of arrivals per rate")
    parser.add_argument("--drain-s", type=float, default=30.0,
                        help="seconds after the last arrival before unfinished requests are "
                             "cancelled")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="multiply ShareGPT's mean lengths (161 in, 338 out)")
    parser.add_argument("--system-prompt-tokens", type=int, default=1000,
                        help="shared-prefix: tokens of the common system prompt")
    parser.add_argument("--ttft-threshold-s", type=float, default=1.0)
    add_run_args(parser, quick="one short low rate")
    parser.add_argument("serve_flags", nargs="*",
                        help="after --: extra flags for pagoda serve (engine flags)")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.duration_s, args.drain_s = "2", 4.0, 15.0
        args.length_scale, args.system_prompt_tokens = 0.1, 256
    return args


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args()
    model_dir = Path(args.model) if args.model else demo_model_path()
    hf_config = AutoConfig.from_pretrained(model_dir)
    max_model_len = hf_config.max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = vocabulary_words(tokenizer)
    system_prompt = system_prompt_text(tokenizer, words, np.random.default_rng(args.seed),
                                       args.system_prompt_tokens)
    rates = [float(rate) for rate in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="pagoda-serving-") as workdir:
        server, url = start_pagoda_serve(Path(workdir), model_dir, "--served-model-name",
                                         "bench", *args.serve_flags)
        try:
            settings = SweepSettings(url, "bench", args.workload, args.duration_s, args.drain_s,
                                     args.length_scale, args.seed, hf_config.vocab_size,
                                     max_model_len, system_prompt, words)
            sweep = run_sweep(settings, rates)
            peak_rss_mib = server.peak_rss_mib()
        finally:
            server.stop()

    sample = sharegpt_like(200, hf_config.vocab_size, max_model_len, args.seed, args.length_scale)
    result = {
        "benchmark": f"online serving, Poisson arrivals, {WORKLOAD_ENDPOINTS[args.workload]}",
        "workload": args.workload,
        "machine": machine_description(),
        "model": str(model_dir) if args.model else "pagoda demo model",
        "notes": args.notes,
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
    name = "serving-cpu.json" if args.workload == "sharegpt" else f"serving-{args.workload}-cpu.json"
    output = output_path(args.output, name, args.quick)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, output.with_suffix(".png"))
    print(json.dumps({"sustainable_rate": result["systems"]["pagoda serve"]["sustainable_rate"],
                      "threshold_s": args.ttft_threshold_s}))
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
