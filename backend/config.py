"""Engine configuration: the keyword arguments of `LLM(...)`, with vLLM's names.

Validated on construction; every error names the argument, so the CLI can print it as a flag.
Values that depend on the model (dtype "auto", max_model_len, the KV block count) are resolved by
the engine once the model is loaded, through `resolve_dtype` and `resolve_max_model_len`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# NOTE: torch is imported inside the methods that need it: the CLI builds its flags (and
# `pagoda --help`) from this module, and importing torch takes seconds.
if TYPE_CHECKING:
    import torch

from pagoda.backend.pooling_params import POOLING_TYPES
from pagoda.backend.quantization.names import QUANTIZATION_METHODS, canonical_scheme

from pagoda.backend.structured.params import BACKENDS, DEFAULT_BACKEND

logger = logging.getLogger(__name__)

# dtype names accepted -> torch's attribute names
DTYPES: dict[str, str] = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3
# Sizes as people write them: a number (1.5e9 too) and a unit. K, M, G and T are powers of 1024,
# as in `free -g` or docker's --memory; KB, MB... are powers of 1000; KiB, MiB... of 1024.
_SIZE = re.compile(r"(\d+(?:\.\d*)?(?:e\+?\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_UNIT_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


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
    # torch's intra-op threads on CPU; None: $OMP_NUM_THREADS, else the cores this process may
    # use (backend/host.py).
    cpu_threads: int | None = None
    # CUDA graphs for decode steps (on CUDA with a backend that supports them) unless
    # enforce_eager; cuda_graph_sizes are the batch-size buckets (default: cuda_graph_sizes()).
    enforce_eager: bool = False
    cuda_graph_sizes: list[int] | None = None
    # Run decode steps through the graphs' padded static buffers even without CUDA graphs,
    # eagerly: how the tests check the padded path on CPU.
    static_decode_buffers: bool = False
    # How embedding requests pool the final hidden states when they do not say: "last" or "mean".
    pooling: str = "last"
    structured_outputs_backend: str = DEFAULT_BACKEND
    # The checkpoint's quantization (checked against its quantization_config), or an online
    # scheme for an unquantized checkpoint ("int8", "fp8"); None: as the checkpoint says.
    quantization: str | None = None
    # Where requests' default sampling settings come from (backend/generation_defaults.py):
    # "auto" (the model's generation_config.json), "vllm" (none) or a folder.
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        if self.model is not None:
            _check_model_location(self.model)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _require_positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len", "cpu_threads"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        for size in self.cuda_graph_sizes or []:
            _require_positive("cuda_graph_sizes", size)
        if self.cuda_graph_sizes is not None and not self.cuda_graph_sizes:
            raise ValueError("cuda_graph_sizes must name at least one batch size")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(
                f"pooling must be one of {', '.join(POOLING_TYPES)}, got {self.pooling!r}"
            )
        if self.structured_outputs_backend not in BACKENDS:
            raise ValueError(
                f"structured_outputs_backend must be one of {sorted(BACKENDS)}, "
                f"got {self.structured_outputs_backend!r}"
            )
        if self.quantization is not None and \
                canonical_scheme(self.quantization) not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        if (self.generation_config not in ("auto", "vllm")
                and not Path(self.generation_config).expanduser().is_dir()):
            raise ValueError(
                "generation_config must be 'auto', 'vllm' or a folder holding a "
                f"generation_config.json, got {self.generation_config!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(
        self, checkpoint_dtype: torch.dtype | None, quantized: bool = False
    ) -> torch.dtype:
        """The compute dtype: the one asked for, else the checkpoint's (on CPU float32, where
        half-precision matmuls are slow, but bfloat16 for quantized weights, which torch's
        packed int8/int4 kernels multiply fast only with bfloat16 activations; bfloat16 for
        float32 checkpoints on CUDA)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, DTYPES[self.dtype])
        if self.torch_device.type == "cpu":
            return torch.bfloat16 if quantized else torch.float32
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


def _check_model_location(model: str) -> None:
    """Fail at once, before seconds of imports and loading, on a model that names a local folder
    which is missing or holds no checkpoint. Anything else may be a hub id."""
    path = Path(model).expanduser()
    what = ("a Hugging Face checkpoint folder (config.json, tokenizer and *.safetensors) or a hub "
            "id such as Qwen/Qwen2.5-0.5B-Instruct")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {model!r} has no config.json: pass {what}")
    elif path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ValueError(f"model {model!r} is not a folder: pass {what}")


def parse_bytes(text: str) -> int:
    """A memory size as people write it: 512MiB, 4GiB, 2G, 1.5e9, 1000000 (bytes, rounded down).
    Raises ValueError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    number, prefix, suffix = match.groups() if match else ("", "", "")
    prefix, suffix = prefix.lower(), suffix.lower()
    if not number or suffix == "i" or (suffix == "ib" and not prefix):
        raise ValueError(
            f"expected a size such as 512MiB, 4GiB, 2G, 1.5e9 or 1000000, got {text!r}"
        )
    base = 1000 if suffix == "b" else 1024
    return int(float(number) * base ** _UNIT_POWERS[prefix])


def _require_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
