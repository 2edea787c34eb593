"""Paged prefill attention (Triton): prompts and prompt chunks of any length, over their cached
context and themselves, causal, GQA, optional sliding window and logit soft-capping.

The new tokens' keys and values are stored in the cache first, so one loop over the cache covers
both the context of a chunked prefill and the chunk itself. One program handles one tile of a
sequence's new tokens for one KV head; its rows are (token, query head of the group) pairs, so
each key and value is read once for the whole group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton.kv_tile import load_kv_tile
from pagoda.kernels.triton.launch import (
    dot_dtype,
    require_same_layout,
    require_unit_stride,
    soft_cap_value,
    window_size,
)
from pagoda.kernels.triton.soft_cap import soft_cap_scores

# Rows (token x head pairs) per program, and keys per loop iteration.
BLOCK_ROWS = 64
BLOCK_KEYS = 64
# tl.dot needs every dimension to be at least 16.
MIN_DOT_SIZE = 16


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Which (sequence, first new token) each program takes: tiles of `tokens_per_tile` tokens.

    Built on the host from the query lengths, once per step; `tokens_per_tile` depends on the
    group size (query heads per KV head), see `tokens_per_tile`.
    """

    seq_index: torch.Tensor  # [num_tiles] int32
    token_start: torch.Tensor  # [num_tiles] int32
    tokens_per_tile: int

    @classmethod
    def build(
        cls, seq_indices: list[int], query_lens: list[int], tokens_per_tile: int,
        device: torch.device,
    ) -> PrefillTiles:
        """Tiles covering the new tokens of sequences `seq_indices` (others are left alone)."""
        pairs = [
            (seq, start)
            for seq in seq_indices
            for start in range(0, query_lens[seq], tokens_per_tile)
        ]
        seqs, starts = zip(*pairs) if pairs else ((), ())
        return cls(
            torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device),
            tokens_per_tile,
        )


def tokens_per_tile(num_heads: int, num_kv_heads: int) -> int:
    """New tokens per program for a model's head counts."""
    return max(1, BLOCK_ROWS // _block_group(num_heads // num_kv_heads))


def _block_group(group_size: int) -> int:
    return triton.next_power_of_2(group_size)


# The block tables' row stride is the step's widest table: not specialized on (see decode).
@triton.jit(do_not_specialize=["stride_table_seq"])
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, context_lens_ptr, tile_seq_ptr, tile_start_ptr,
    scale, window, soft_cap, block_size,
    stride_query_token, stride_query_head, stride_out_token, stride_out_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    GROUP_SIZE: tl.constexpr, BLOCK_GROUP: tl.constexpr, TILE_TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    tile_start = tl.load(tile_start_ptr + tile)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    context_len = tl.load(context_lens_ptr + seq)

    # Row r is token tile_start + r // BLOCK_GROUP with query head r % BLOCK_GROUP of the group.
    rows = tl.arange(0, TILE_TOKENS * BLOCK_GROUP)
    tokens = tile_start + rows // BLOCK_GROUP
    heads = kv_head * GROUP_SIZE + rows % BLOCK_GROUP
    row_valid = (tokens < query_len) & (rows % BLOCK_GROUP < GROUP_SIZE)
    positions = context_len + tokens
    dims = tl.arange(0, BLOCK_DIM)
    row_mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    flat_tokens = (query_start + tokens).to(tl.int64)
    query = tl.load(
        query_ptr + flat_tokens[:, None] * stride_query_token
        + heads[:, None] * stride_query_head + dims[None, :],
        mask=row_mask, other=0.0,
    ).to(tl.float32).to(DOT_DTYPE)

    # Keys any row of the tile sees: from the first row's window start to the last row.
    keys_start = tl.maximum(context_len + tile_start - window + 1, 0)
    keys_end = context_len + tl.minimum(tile_start + TILE_TOKENS, query_len)
    # NOTE: a row may see no key of a whole tile (causal or window masking). Starting the running
    # maximum finite (not -inf) keeps exp(max_old - max_new) at exp(0) there instead of
    # exp(-inf + inf) = NaN; its first visible key then scales the empty sums by exp(-huge) = 0.
    running_max = tl.full([TILE_TOKENS * BLOCK_GROUP], -1.0e30, tl.float32)
    running_sum = tl.zeros([TILE_TOKENS * BLOCK_GROUP], tl.float32)
    acc = tl.zeros([TILE_TOKENS * BLOCK_GROUP, BLOCK_DIM], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    for block_start in range(keys_start, keys_end, BLOCK_N):
        keys_pos = block_start + tl.arange(0, BLOCK_N)
        key_mask = keys_pos < keys_end
        keys, values = load_kv_tile(
            key_cache_ptr, value_cache_ptr, table, keys_pos, key_mask, dims, kv_head, block_size,
            stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM,
        )

        scores = tl.dot(query, tl.trans(keys).to(DOT_DTYPE), input_precision="ieee") * scale
        if SOFT_CAP:
            scores = soft_cap_scores(scores, soft_cap)
        visible = (
            row_valid[:, None]
            & key_mask[None, :]
            & (keys_pos[None, :] <= positions[:, None])
            & (keys_pos[None, :] > positions[:, None] - window)
        )
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(
            probs.to(DOT_DTYPE), values.to(DOT_DTYPE), input_precision="ieee"
        )
        running_max = new_max

    # Padding rows saw nothing (sum 0); dividing by 1 keeps them finite. They are not stored.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        out_ptr + flat_tokens[:, None] * stride_out_token
        + heads[:, None] * stride_out_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask,
    )


def paged_prefill_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    tiles: PrefillTiles,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Same contract as `paged_prefill_attention_reference`, for the sequences `tiles` covers.

    block_tables [num_seqs, max_blocks], query_start_loc [num_seqs + 1] and context_lens
    [num_seqs] are int32 on the query's device. Writes the covered sequences' rows of `out` (a
    new tensor when None) and returns it; other rows are left as they were.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if tiles.seq_index.numel() == 0:
        return out
    require_unit_stride(query=query, key_cache=key_cache, value_cache=value_cache, out=out)
    require_same_layout(key_cache, value_cache)
    if tiles.tokens_per_tile != tokens_per_tile(num_heads, num_kv_heads):
        raise ValueError("tiles were built for another group size; see tokens_per_tile()")
    _prefill_kernel[(tiles.seq_index.numel(), num_kv_heads)](
        query, key_cache, value_cache, out,
        block_tables, query_start_loc, context_lens, tiles.seq_index, tiles.token_start,
        scale, window_size(sliding_window), soft_cap_value(soft_cap), key_cache.shape[1],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP_SIZE=group_size, BLOCK_GROUP=_block_group(group_size),
        TILE_TOKENS=tiles.tokens_per_tile,
        HEAD_DIM=head_dim, BLOCK_DIM=max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)),
        BLOCK_N=BLOCK_KEYS, DOT_DTYPE=dot_dtype(key_cache), SOFT_CAP=soft_cap is not None,
    )
    return out
