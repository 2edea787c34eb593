"""Writing new keys and values into the paged KV cache (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton.launch import require_same_layout, require_unit_stride

# A program stores TOKENS_PER_PROGRAM tokens x at most ROW_CHUNK elements of each token's row
# (its num_kv_heads * head_dim values): 8 x 1024 stays in registers (8 KV heads of 128 compile
# without spills on sm_90), while a whole MHA row (32 heads of 128) per program spilled. Wider
# rows take several programs along the grid's second axis.
TOKENS_PER_PROGRAM = 8
ROW_CHUNK = 1024


# num_tokens changes every step: not specialized on (no variant for 1 or multiples of 16).
@triton.jit(do_not_specialize=["num_tokens"])
def _store_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_tokens, block_size,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, ROW_SIZE: tl.constexpr, BLOCK_ROW: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    slots = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    # This program's chunk of the rows, split back into (head, dim).
    row = tl.program_id(1) * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    head = row // HEAD_DIM
    dim = row % HEAD_DIM
    mask = (slots >= 0)[:, None] & (row < ROW_SIZE)[None, :]
    tokens = tokens.to(tl.int64)
    key_offsets = (
        tokens[:, None] * stride_key_token + head[None, :] * stride_key_head + dim[None, :]
    )
    value_offsets = (
        tokens[:, None] * stride_value_token + head[None, :] * stride_value_head + dim[None, :]
    )
    cache_offsets = (
        (slots // block_size)[:, None] * stride_cache_block
        + (slots % block_size)[:, None] * stride_cache_slot
        + head[None, :] * stride_cache_head
        + dim[None, :]
    )
    key = tl.load(key_ptr + key_offsets, mask=mask).to(tl.float32)
    value = tl.load(value_ptr + value_offsets, mask=mask).to(tl.float32)
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `store_kv_reference`: token i's key and value go to flat slot
    `slot_mapping[i]`; slot -1 (a padding row) is skipped.

    key, value: [num_tokens, num_kv_heads, head_dim], the last dimension contiguous;
    caches: [num_blocks, block_size, num_kv_heads, head_dim], the last dimension contiguous,
    sharing one set of strides.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    require_unit_stride(key=key, value=value, key_cache=key_cache, value_cache=value_cache)
    require_same_layout(key_cache, value_cache)
    row_size = num_kv_heads * head_dim
    block_row = min(ROW_CHUNK, triton.next_power_of_2(row_size))
    grid = (triton.cdiv(num_tokens, TOKENS_PER_PROGRAM), triton.cdiv(row_size, block_row))
    _store_kv_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        num_tokens, key_cache.shape[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=head_dim, ROW_SIZE=row_size, BLOCK_ROW=block_row,
        BLOCK_TOKENS=TOKENS_PER_PROGRAM,
    )
