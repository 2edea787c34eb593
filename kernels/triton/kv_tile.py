"""Loading a tile of cached keys and values through a block table (shared by the attention
kernels)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    key_cache_ptr, value_cache_ptr, table, keys_pos, key_mask, dims, kv_head, block_size,
    stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM: tl.constexpr,
):
    """Keys and values [len(keys_pos), len(dims)] of one KV head at token positions `keys_pos`
    of the sequence whose block table starts at `table`, as float32 (the interpreter computes
    bf16 wrongly, and accumulating in float32 is right anyway); masked-out entries are 0."""
    blocks = tl.load(table + keys_pos // block_size, mask=key_mask, other=0).to(tl.int64)
    slots = (
        blocks * stride_cache_block
        + (keys_pos % block_size) * stride_cache_slot
        + kv_head * stride_cache_head
    )
    load_mask = key_mask[:, None] & (dims < HEAD_DIM)[None, :]
    offsets = slots[:, None] + dims[None, :]
    keys = tl.load(key_cache_ptr + offsets, mask=load_mask, other=0.0).to(tl.float32)
    values = tl.load(value_cache_ptr + offsets, mask=load_mask, other=0.0).to(tl.float32)
    return keys, values
