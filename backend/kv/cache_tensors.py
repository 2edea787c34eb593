"""The KV cache's memory: per layer a K and a V tensor [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pagoda.backend.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from pagoda.backend.host import physical_memory_bytes

logger = logging.getLogger(__name__)

# The share of the machine's memory the default CPU KV budget may take.
CPU_MEMORY_FRACTION = 0.25


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def choose_num_blocks(
    config: EngineConfig,
    block_bytes: int,
    device: torch.device,
    model_max_len: int,
    profiled_budget: int | None = None,
) -> int:
    """num_kv_blocks when given; otherwise as many blocks as the memory budget holds: the
    kv_cache_memory_bytes flag; on CUDA the budget a profiling step left
    (`pagoda.backend.memory_profile`), or without one gpu_memory_utilization of the free memory,
    which leaves a step's activations unbudgeted; on CPU default_cpu_kv_budget."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif device.type == "cuda" and profiled_budget is not None:
        budget = profiled_budget
    elif device.type == "cuda":
        logger.warning("sizing the KV cache without a memory profile: activations not budgeted")
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = int(free_bytes * config.gpu_memory_utilization)
    else:
        budget = default_cpu_kv_budget(config, block_bytes, model_max_len)
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"the KV memory budget ({budget} bytes) holds no block of {block_bytes} bytes; "
            "raise kv_cache_memory_bytes or gpu_memory_utilization"
        )
    return num_blocks


def default_cpu_kv_budget(config: EngineConfig, block_bytes: int, model_max_len: int) -> int:
    """2 GiB, but no more than the configuration can fill (max_num_seqs sequences of
    max_model_len tokens, as vLLM sizes its pool) nor a quarter of the machine's memory (what a
    small VM or container can spare next to the weights and everything else)."""
    max_model_len = config.max_model_len or model_max_len
    blocks_per_sequence = -(-max_model_len // config.block_size)
    bounds = {
        "default": DEFAULT_CPU_KV_CACHE_BYTES,
        "max_num_seqs x max_model_len": config.max_num_seqs * blocks_per_sequence * block_bytes,
        "machine memory / 4": int(physical_memory_bytes() * CPU_MEMORY_FRACTION),
    }
    reason = min(bounds, key=bounds.__getitem__)
    logger.info("KV cache budget: %.0f MiB (%s)", bounds[reason] / 2**20, reason)
    return bounds[reason]


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [
        (_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(num_layers)
    ]
    total = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) * num_blocks
    # NOTE: on CPU the pages are committed only when first written (see _zeros), which the log
    # says, lest the budget read as the memory the process takes.
    lazily = " (RAM committed as blocks are first used)" if device.type == "cpu" else ""
    logger.info("KV cache: %d blocks of %d tokens, %.1f MiB%s", num_blocks, block_size,
                total / 2**20, lazily)
    return caches


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. On CPU it comes from calloc (numpy's zeros), whose pages the
    OS maps only when first written: blocks no request has used yet cost no RAM, so a server
    starts small whatever its KV budget (torch.zeros would write, and so commit, every page).
    Zeros rather than uninitialized memory: a never-written slot must not hold a NaN that
    attention would multiply by a zero weight."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)
