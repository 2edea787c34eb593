"""Pieces shared by the benchmarks: the synthetic workloads (ShareGPT-like, fixed-length), a step
loop that watches the KV cache, and the machine's description recorded with every result."""

from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

from pagoda.backend import LLMEngine, SamplingParams

RESULTS_DIR = Path(__file__).parent / "results"
# --quick runs write here (git-ignored), so a smoke run never overwrites a committed result.
QUICK_RESULTS_DIR = RESULTS_DIR / "tmp"

# Means of ShareGPT conversations' prompt and completion lengths in tokens, as reported in the
# vLLM paper (Kwon et al., 2023, table 1 / fig. 11): 161 in, 338 out. Lengths are drawn
# log-normally around those means (sigma 1), which gives ShareGPT's long tail.
SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338
LOGNORMAL_SIGMA = 1.0


@dataclass(slots=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def sharegpt_like(
    num_requests: int, vocab_size: int, max_model_len: int, seed: int, scale: float
) -> list[Request]:
    """Seeded synthetic requests with ShareGPT's mean lengths times `scale`, long-tailed."""
    rng = np.random.default_rng(seed)

    def lengths(mean: float) -> np.ndarray:
        mu = np.log(mean * scale) - LOGNORMAL_SIGMA**2 / 2  # so the mean is mean * scale
        return np.maximum(1, rng.lognormal(mu, LOGNORMAL_SIGMA, num_requests).astype(int))

    requests = []
    for prompt_len, output_len in zip(lengths(SHAREGPT_MEAN_PROMPT), lengths(SHAREGPT_MEAN_OUTPUT)):
        prompt_len = int(min(prompt_len, max_model_len // 2))
        output_len = int(min(output_len, max_model_len - prompt_len))
        requests.append(Request(random_prompt(rng, prompt_len, vocab_size), output_len))
    return requests


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    """BOS, then uniform token ids above the demo tokenizer's special ids (0-2)."""
    return [1] + rng.integers(3, vocab_size, length - 1).tolist() if length > 1 else [1]


def fixed_length(num_requests: int, input_len: int, output_len: int, vocab_size: int,
                 seed: int) -> list[Request]:
    """Seeded random prompts of exactly `input_len` tokens, each to generate `output_len`."""
    rng = np.random.default_rng(seed)
    return [Request(random_prompt(rng, input_len, vocab_size), output_len)
            for _ in range(num_requests)]


@dataclass(slots=True)
class KVPeaks:
    """What a run looked like to the KV cache, sampled after every engine step."""

    peak_used_blocks: int = 0
    peak_unshared_blocks: int = 0  # if every live sequence held its own copy of its tokens
    kv_waste_at_peak: float = 0.0  # 1 - tokens / slots of the used blocks, at peak_used_blocks
    tokens_at_peak: int = 0
    peak_rss_mib: float = 0.0
    num_steps: int = 0


def run_watching_kv(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                    arrive_every_steps: int = 0, desc: str = "KV-watched run") -> KVPeaks:
    """Run the requests to completion, step by step; request i is added before step
    i * `arrive_every_steps` (0: all at once). Leaves the engine empty (checked)."""
    process = psutil.Process()
    blocks = engine.block_manager
    peaks = KVPeaks()
    pending = list(enumerate(zip(prompts, params)))
    progress = tqdm(total=len(prompts), desc=desc, leave=False)
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] * arrive_every_steps <= peaks.num_steps:
            index, (prompt, request_params) = pending.pop(0)
            engine.add_request(f"kv-{index}", prompt, request_params)
        progress.update(sum(output.finished for output in engine.step()))
        peaks.num_steps += 1
        live = engine.scheduler.live_sequences()
        unshared = sum(blocks.num_blocks_for(seq.num_computed_tokens) for seq in live)
        peaks.peak_unshared_blocks = max(peaks.peak_unshared_blocks, unshared)
        peaks.peak_rss_mib = max(peaks.peak_rss_mib, process.memory_info().rss / 2**20)
        if blocks.pool.num_used_blocks > peaks.peak_used_blocks:
            stats = engine.kv_stats()
            peaks.peak_used_blocks = stats.num_used_blocks
            peaks.kv_waste_at_peak = stats.waste
            peaks.tokens_at_peak = stats.num_tokens
    progress.close()
    engine.check_no_leaks()
    return peaks


def output_path(explicit: str | None, name: str, quick: bool) -> Path:
    """Where a result JSON goes: `explicit` if given, else results/ (results/tmp/ if quick)."""
    path = Path(explicit) if explicit else (QUICK_RESULTS_DIR if quick else RESULTS_DIR) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def add_run_args(parser: argparse.ArgumentParser, quick: str) -> None:
    """--seed, --quick, --notes and --output, as every benchmark takes them; `quick` says what
    this one's smoke run does."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {quick}, written under results/tmp/")
    parser.add_argument("--notes", default="", help="free text stored in the result")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/)")


def machine_description() -> dict[str, object]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


