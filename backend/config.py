"""Engine configuration: the keyword arguments of `LLM(...)`, with vLLM's names.

Validated on construction; every error names the argument, so the CLI can print it as a flag.
Values that depend on the model (dtype "auto", max_model_len, the KV block count) are resolved by
the engine once the model is loaded, through `resolve_dtype` and `resolve_max_model_len`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagoda.backend.structured.manager import BACKENDS, DEFAULT_BACKEND

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    allow_pickle_weights: bool = False
    trust_remote_code: bool = False
    structured_outputs_backend: str = DEFAULT_BACKEND

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _require_positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.structured_outputs_backend not in BACKENDS:
            raise ValueError(
                f"structured_outputs_backend must be one of {sorted(BACKENDS)}, "
                f"got {self.structured_outputs_backend!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The compute dtype: the one asked for, else the checkpoint's (float32 on CPU, where
        half-precision matmuls are slow, and bfloat16 for float32 checkpoints on CUDA)."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.torch_device.type == "cpu":
            return torch.float32
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16

    def resolve_max_model_len(self, model_max_len: int, kv_capacity_tokens: int) -> int:
        """max_model_len checked against the model's positions and the KV pool: a sequence of that
        length must fit the pool alone, or no request of that length could ever run."""
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's maximum of {model_max_len}"
            )
        if max_model_len > kv_capacity_tokens:
            if self.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={max_model_len} does not fit in the KV cache "
                    f"({kv_capacity_tokens} tokens); raise num_kv_blocks or the KV memory budget"
                )
            logger.warning(
                "max_model_len lowered from %d to %d to fit the KV cache", max_model_len,
                kv_capacity_tokens,
            )
            max_model_len = kv_capacity_tokens
        return max_model_len


def _require_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
