"""Paged decode attention (Triton): one new token per sequence, GQA, split-K for long contexts.

Decode reads every cached key and value once and does little arithmetic on them, so it is bound by
memory bandwidth. One program handles one (sequence, KV head, partition of the context) and all
the query heads sharing that KV head, so each key and value is read once per KV head. Long
contexts are split into partitions of `partition_size` tokens processed in parallel; a second
kernel merges the partitions' partial results by their log-sum-exp.
"""

from __future__ import annotations

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

DEFAULT_PARTITION_SIZE = 512
# Keys per loop iteration.
BLOCK_KEYS = 64
# tl.dot needs every dimension to be at least 16: query heads, keys and head_dim are padded.
MIN_DOT_SIZE = 16


# Arguments that change from step to step are not specialized on (Triton would otherwise compile
# a variant for values equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["num_partitions", "stride_table_seq"])
def _decode_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    scale, window, soft_cap, num_heads, num_partitions, block_size,
    stride_query_seq, stride_query_head, stride_out_seq, stride_out_head,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_table_seq,
    GROUP_SIZE: tl.constexpr, BLOCK_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    # NOTE: int64 before any product with a runtime size: partial-result offsets reach
    # num_seqs * num_heads * num_partitions * head_dim, past 2^31 for big batches of long contexts.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Visible keys: [first_key, seq_len); this program's share of them: [start, end).
    first_key = tl.maximum(seq_len - window, 0)
    start = tl.maximum(partition * PARTITION_SIZE, first_key)
    end = tl.minimum((partition + 1) * PARTITION_SIZE, seq_len)
    if start >= end:
        # Past the sequence's end or before its window: the merge skips this partition.
        return

    group = tl.arange(0, BLOCK_GROUP)
    heads = kv_head * GROUP_SIZE + group
    dims = tl.arange(0, BLOCK_DIM)
    row_mask = (group < GROUP_SIZE)[:, None] & (dims < HEAD_DIM)[None, :]
    query = tl.load(
        query_ptr + seq * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
        mask=row_mask, other=0.0,
    ).to(tl.float32).to(DOT_DTYPE)

    # NOTE: every tile holds at least one visible key (the loop starts at `start`), so the
    # running maximum is finite after the first tile and exp(-inf - max) never sees inf - inf.
    running_max = tl.full([BLOCK_GROUP], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_GROUP], tl.float32)
    acc = tl.zeros([BLOCK_GROUP, BLOCK_DIM], tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    for tile_start in range(start, end, BLOCK_N):
        keys_pos = tile_start + tl.arange(0, BLOCK_N)
        key_mask = keys_pos < end
        keys, values = load_kv_tile(
            key_cache_ptr, value_cache_ptr, table, keys_pos, key_mask, dims, kv_head, block_size,
            stride_cache_block, stride_cache_slot, stride_cache_head, HEAD_DIM,
        )

        scores = tl.dot(query, tl.trans(keys).to(DOT_DTYPE), input_precision="ieee") * scale
        if SOFT_CAP:
            scores = soft_cap_scores(scores, soft_cap)
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(
            probs.to(DOT_DTYPE), values.to(DOT_DTYPE), input_precision="ieee"
        )
        running_max = new_max

    out = acc / running_sum[:, None]
    if SPLIT:
        # Partials are [num_seqs, num_heads, num_partitions(, head_dim)], float32.
        index = (seq * num_heads + heads) * num_partitions + partition
        head_mask = group < GROUP_SIZE
        tl.store(partial_max_ptr + index, running_max, mask=head_mask)
        tl.store(partial_sum_ptr + index, running_sum, mask=head_mask)
        tl.store(partial_out_ptr + index[:, None] * HEAD_DIM + dims[None, :], out, mask=row_mask)
    else:
        tl.store(
            out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=row_mask,
        )


@triton.jit(do_not_specialize=["num_partitions"])
def _merge_partitions_kernel(
    out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr, seq_lens_ptr,
    window, num_heads, num_partitions, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_PARTITIONS: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)  # int64 offsets, as in _decode_kernel
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_key = tl.maximum(seq_len - window, 0)
    # The partitions the first kernel wrote (it skipped those with no visible key).
    partitions = tl.arange(0, BLOCK_PARTITIONS)
    written = (partitions >= first_key // PARTITION_SIZE) & (
        partitions < tl.cdiv(seq_len, PARTITION_SIZE)
    )
    index = (seq * num_heads + head) * num_partitions + partitions
    maxes = tl.load(partial_max_ptr + index, mask=written, other=float("-inf"))
    global_max = tl.max(maxes, 0)
    # Partition p's softmax denominator relative to the global maximum; 0 where not written.
    weights = tl.load(partial_sum_ptr + index, mask=written, other=0.0) * tl.exp(maxes - global_max)
    dims = tl.arange(0, BLOCK_DIM)
    partial = tl.load(
        partial_out_ptr + index[:, None] * HEAD_DIM + dims[None, :],
        mask=written[:, None] & (dims < HEAD_DIM)[None, :], other=0.0,
    )
    out = tl.sum(partial * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM,
    )


def paged_decode_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Same contract as `paged_decode_attention_reference`.

    block_tables [num_seqs, max_blocks] and seq_lens [num_seqs] are int32 on the query's device;
    max_seq_len (at least max(seq_lens)) sizes the launch without reading seq_lens back; it is a
    runtime size (programs past a sequence's end return at once), so a caller that needs a fixed
    launch (a CUDA graph) passes max_model_len. Contexts longer than `partition_size` are split
    into partitions attended in parallel, then merged; the merge compiles once per power of two
    of partitions.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    output = torch.empty_like(query)
    if num_seqs == 0:
        return output
    require_unit_stride(query=query, key_cache=key_cache, value_cache=value_cache)
    require_same_layout(key_cache, value_cache)
    group_size = num_heads // num_kv_heads
    num_partitions = triton.cdiv(max_seq_len, partition_size)
    split = num_partitions > 1
    window = window_size(sliding_window)
    partial_shape = (num_seqs, num_heads, num_partitions) if split else (0,)
    partial_max = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    partial_out = torch.empty(
        (*partial_shape, head_dim) if split else (0,), dtype=torch.float32, device=query.device
    )
    block_dim = max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))
    _decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        query, key_cache, value_cache, block_tables, seq_lens,
        output, partial_out, partial_max, partial_sum,
        scale, window, soft_cap_value(soft_cap), num_heads, num_partitions, key_cache.shape[1],
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP_SIZE=group_size, BLOCK_GROUP=max(MIN_DOT_SIZE, triton.next_power_of_2(group_size)),
        HEAD_DIM=head_dim, BLOCK_DIM=block_dim,
        BLOCK_N=max(MIN_DOT_SIZE, min(BLOCK_KEYS, triton.next_power_of_2(partition_size))),
        PARTITION_SIZE=partition_size, SPLIT=split, DOT_DTYPE=dot_dtype(key_cache),
        SOFT_CAP=soft_cap is not None,
    )
    if split:
        _merge_partitions_kernel[(num_seqs, num_heads)](
            output, partial_out, partial_max, partial_sum, seq_lens,
            window, num_heads, num_partitions, output.stride(0), output.stride(1),
            HEAD_DIM=head_dim, BLOCK_DIM=block_dim,
            BLOCK_PARTITIONS=triton.next_power_of_2(num_partitions),
            PARTITION_SIZE=partition_size,
        )
    return output
