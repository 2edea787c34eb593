"""Reference attention in plain torch: gather each sequence's blocks, then SDPA.

Sequences decoding one token are batched into one SDPA call over their padded contexts;
sequences feeding several tokens (prefill chunks) each get their own call with an offset causal
mask, since their query lengths differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.backend.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from pagoda.kernels import store_kv_reference


@dataclass(slots=True)
class PrefillSlice:
    token_start: int
    token_end: int
    block_ids: torch.Tensor  # [num_blocks covering seq_len]
    seq_len: int
    mask: torch.Tensor  # [query_len, seq_len] bool, True = attend


@dataclass(slots=True)
class TorchAttentionMetadata(AttentionMetadata):
    layout: BatchLayout
    decode_token_index: torch.Tensor  # [num_decodes] rows of the flat batch that decode
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size]
    prefills: list[PrefillSlice]


class TorchAttentionBackend(AttentionBackend):
    def prepare(
        self, layout: BatchLayout, device: torch.device, sliding_window: int | None
    ) -> TorchAttentionMetadata:
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_seq_lens: list[int] = []
        prefills: list[PrefillSlice] = []
        starts = layout.query_start_loc
        for i, (query_len, seq_len) in enumerate(zip(layout.query_lens, layout.seq_lens)):
            if query_len == 1:
                decode_rows.append(starts[i])
                decode_tables.append(layout.block_tables[i])
                decode_seq_lens.append(seq_len)
                continue
            num_blocks = -(-seq_len // layout.block_size)
            block_ids = torch.tensor(layout.block_tables[i][:num_blocks], device=device)
            query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
            mask = _visible(torch.arange(seq_len, device=device)[None, :], query_pos, sliding_window)
            prefills.append(PrefillSlice(starts[i], starts[i + 1], block_ids, seq_len, mask))
        max_blocks = max((len(t) for t in decode_tables), default=0)
        tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in decode_tables], dtype=torch.long, device=device
        ).view(len(decode_tables), max_blocks)
        key_pos = torch.arange(max_blocks * layout.block_size, device=device)[None, :]
        query_pos = torch.tensor(decode_seq_lens, device=device)[:, None] - 1
        decode_mask = (_visible(key_pos, query_pos, sliding_window))[:, None, None, :]
        return TorchAttentionMetadata(
            layout=layout,
            decode_token_index=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_block_tables=tables,
            decode_mask=decode_mask,
            prefills=prefills,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        assert isinstance(metadata, TorchAttentionMetadata)
        store_kv_reference(key, value, key_cache, value_cache, metadata.layout.slot_mapping)
        if not metadata.prefills:
            # Pure decode (the common step): one batched call, no scatter into place.
            return _decode(query, key_cache, value_cache, metadata, scale)
        output = torch.empty_like(query)
        if metadata.decode_token_index.numel():
            rows = metadata.decode_token_index
            output[rows] = _decode(query[rows], key_cache, value_cache, metadata, scale)
        for piece in metadata.prefills:
            output[piece.token_start : piece.token_end] = _prefill(
                query[piece.token_start : piece.token_end], key_cache, value_cache, piece, scale
            )
        return output


def _visible(
    key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Causal visibility, optionally limited to the last `sliding_window` positions."""
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., num_blocks] block ids -> [..., num_kv_heads, num_blocks * block_size, head_dim]."""
    blocks = cache[block_ids]  # [..., num_blocks, block_size, heads, dim]
    tokens = blocks.flatten(-4, -3)  # [..., num_blocks * block_size, heads, dim]
    return tokens.transpose(-3, -2)


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: TorchAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    keys = _gather(key_cache, metadata.decode_block_tables).to(query.dtype)
    values = _gather(value_cache, metadata.decode_block_tables).to(query.dtype)
    out = F.scaled_dot_product_attention(
        query[:, :, None, :],  # [num_decodes, heads, 1, dim]
        keys,
        values,
        attn_mask=metadata.decode_mask,
        scale=scale,
        enable_gqa=True,
    )
    return out[:, :, 0, :]


def _prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    piece: PrefillSlice,
    scale: float,
) -> torch.Tensor:
    keys = _gather(key_cache, piece.block_ids)[:, : piece.seq_len].to(query.dtype)
    values = _gather(value_cache, piece.block_ids)[:, : piece.seq_len].to(query.dtype)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1),  # [heads, query_len, dim]
        keys,
        values,
        attn_mask=piece.mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
