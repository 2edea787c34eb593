"""Pagoda's engine: paged KV cache, continuous batching, native models, offline API."""

from pagoda.backend.config import EngineConfig
from pagoda.backend.engine import LLMEngine
from pagoda.backend.llm import LLM
from pagoda.backend.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.backend.pooling import PoolingParams
from pagoda.backend.sampling_params import SamplingParams

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
