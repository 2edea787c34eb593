"""The KV cache's memory: per layer a K and a V tensor [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pagoda.backend.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig

logger = logging.getLogger(__name__)


def bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


def choose_num_blocks(
    config: EngineConfig, block_bytes: int, device: torch.device, profiled_budget: int | None = None
) -> int:
    """num_kv_blocks when given; otherwise as many blocks as the memory budget holds: the
    kv_cache_memory_bytes flag; on CUDA the budget a profiling step left
    (`pagoda.backend.memory_profile`), or without one gpu_memory_utilization of the free memory,
    which leaves a step's activations unbudgeted; 2 GiB on CPU."""
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
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"the KV memory budget ({budget} bytes) holds no block of {block_bytes} bytes; "
            "raise kv_cache_memory_bytes or gpu_memory_utilization"
        )
    return num_blocks


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
    logger.info("KV cache: %d blocks of %d tokens, %.1f MiB", num_blocks, block_size, total / 2**20)
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
