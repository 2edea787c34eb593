"""Copying whole KV blocks, for copy-on-write of shared blocks (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# Elements per program: a block of 16 tokens x 8 KV heads x 128 dims is 4 programs.
CHUNK_SIZE = 4096


@triton.jit
def _copy_blocks_kernel(cache_ptr, sources_ptr, targets_ptr, block_numel, CHUNK: tl.constexpr):
    pair = tl.program_id(0)
    offsets = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < block_numel
    source = tl.load(sources_ptr + pair).to(tl.int64)
    target = tl.load(targets_ptr + pair).to(tl.int64)
    # A plain copy does no arithmetic, so the values keep their own type (no float32 round trip).
    values = tl.load(cache_ptr + source * block_numel + offsets, mask=mask)
    tl.store(cache_ptr + target * block_numel + offsets, values, mask=mask)


def copy_blocks_triton(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]], sources: torch.Tensor, targets: torch.Tensor
) -> None:
    """For every layer, block targets[i] of K and V becomes a copy of block sources[i].

    Unlike `copy_blocks_reference`, pairs are copied in parallel: no target may also be a source
    (the caller checks, see `copies_overlap`), and targets are distinct. Caches must be contiguous.
    """
    if sources.numel() == 0:
        return
    for key_cache, value_cache in kv_caches:
        for cache in (key_cache, value_cache):
            if not cache.is_contiguous():
                raise ValueError("copy_blocks_triton needs contiguous caches")
            block_numel = cache[0].numel()
            chunk = min(CHUNK_SIZE, triton.next_power_of_2(block_numel))
            grid = (sources.numel(), triton.cdiv(block_numel, chunk))
            _copy_blocks_kernel[grid](
                cache, sources, targets, block_numel, CHUNK=chunk
            )


def copies_overlap(copies: list[tuple[int, int]]) -> bool:
    """Whether a block is both copied from and copied to, which needs every read before any
    write (as `copy_blocks_reference` does) rather than a parallel copy."""
    sources = {source for source, _ in copies}
    return any(target in sources for _, target in copies)
