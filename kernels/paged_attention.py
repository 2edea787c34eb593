"""Attention over the paged KV cache, pure-torch references: one sequence at a time, in float32.

The cache holds every token of a sequence (the new ones are stored before attending); token p of
a sequence lives in block `block_table[p // block_size]` at offset `p % block_size`. A query at
position p sees positions max(0, p - sliding_window + 1)..p. With `soft_cap` (Gemma 2's attention
logit soft-capping) a scaled score s becomes soft_cap * tanh(s / soft_cap) before the softmax.
"""

from __future__ import annotations

import torch


def paged_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """One new token per sequence. query [num_seqs, num_heads, head_dim]: row i is the token at
    position seq_lens[i] - 1 of sequence i, whose blocks are block_tables[i]. Returns
    [num_seqs, num_heads, head_dim] in the query's dtype."""
    output = torch.empty_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        output[i : i + 1] = _attend(
            query[i : i + 1], key_cache, value_cache, block_tables[i], seq_len - 1, scale,
            sliding_window, soft_cap,
        )
    return output


def paged_prefill_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Prefill and chunked prefill. query [num_tokens, num_heads, head_dim]: the new tokens of
    all sequences back to back, sequence i owning rows query_start_loc[i]:query_start_loc[i+1],
    which sit at positions context_lens[i] onwards. Each attends causally to its sequence's
    earlier tokens and itself. Returns [num_tokens, num_heads, head_dim] in the query's dtype."""
    output = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for i, context_len in enumerate(context_lens.tolist()):
        rows = slice(starts[i], starts[i + 1])
        output[rows] = _attend(
            query[rows], key_cache, value_cache, block_tables[i], context_len, scale,
            sliding_window, soft_cap,
        )
    return output


def _attend(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    """query [query_len, num_heads, head_dim] at positions context_len onwards, in one sequence."""
    query_len, num_heads, _ = query.shape
    seq_len = context_len + query_len
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    positions = torch.arange(seq_len, device=query.device)
    slots = block_table.long()[positions // block_size] * block_size + positions % block_size
    keys = key_cache.flatten(0, 1)[slots].float()  # [seq_len, num_kv_heads, head_dim]
    values = value_cache.flatten(0, 1)[slots].float()
    group_size = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group_size, dim=1)  # query head h reads KV head h // group_size
    values = values.repeat_interleave(group_size, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    query_pos = positions[context_len:, None]
    visible = positions[None, :] <= query_pos
    if sliding_window is not None:
        visible &= positions[None, :] > query_pos - sliding_window
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, values).to(query.dtype)
