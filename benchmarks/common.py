"""Pieces shared by the benchmarks: the synthetic ShareGPT-like workload and the machine's
description recorded with every result."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).parent / "results"

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
        prompt = [1] + rng.integers(3, vocab_size, prompt_len - 1).tolist() if prompt_len > 1 else [1]
        requests.append(Request(prompt, output_len))
    return requests


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


