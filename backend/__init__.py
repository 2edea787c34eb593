"""Pagoda's engine: paged KV cache, continuous batching, native models, offline API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pagoda.backend.lazy import lazy_attributes

# NOTE: run from a checkout's root (`python -m pytest`, `python -m pagoda.adapters.cli`), Python
# puts the root first on sys.path, where Pagoda's kernels/ folder (installed as pagoda.kernels)
# shadows the PyPI package `kernels` that transformers (5.25 and later) imports, and importing
# transformers fails. Pagoda is installed, so nothing needs the root on the path.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _CHECKOUT]

if TYPE_CHECKING:
    from pagoda.backend.config import EngineConfig
    from pagoda.backend.engine import LLMEngine
    from pagoda.backend.llm import LLM
    from pagoda.backend.outputs import CompletionOutput, Logprob, RequestOutput
    from pagoda.backend.pooling_params import PoolingParams
    from pagoda.backend.sampling_params import SamplingParams

__getattr__ = lazy_attributes(__name__, {
    "LLM": "pagoda.backend.llm",
    "CompletionOutput": "pagoda.backend.outputs",
    "EngineConfig": "pagoda.backend.config",
    "LLMEngine": "pagoda.backend.engine",
    "Logprob": "pagoda.backend.outputs",
    "PoolingParams": "pagoda.backend.pooling_params",
    "RequestOutput": "pagoda.backend.outputs",
    "SamplingParams": "pagoda.backend.sampling_params",
})

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
]
