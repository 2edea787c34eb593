"""Reference attention in plain torch: gather each sequence's blocks, then SDPA.

Sequences decoding one token are batched into one SDPA call over their padded contexts;
sequences feeding several tokens (prefill chunks) each get their own call with an offset causal
mask, since their query lengths differ (a whole prompt uses its new keys and values as they are).

Decoding sequences whose tables start with the same blocks (the samples or beams of one request,
requests hitting one cached prefix) attend to that shared prefix together (cascade attention,
`cascade.py`). Without this, sharing saves KV memory but every sample still pays the full
context in every step.

The masks depend on a layer's sliding window, so the step's metadata derives them per distinct
window, at the first layer that attends with it (`TorchAttentionMetadata.for_window`). Attention
logit soft-capping is not something SDPA does: a capped layer scores its keys explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagoda.backend.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from pagoda.backend.attention.cascade import (
    SharedPrefixes,
    cascade_decode,
    find_shared_prefixes,
    gather_blocks,
    pad_shared_prefixes,
)
from pagoda.kernels import store_kv_reference


@dataclass(slots=True)
class PrefillSlice:
    token_start: int
    token_end: int
    block_ids: torch.Tensor  # [num_blocks covering seq_len]
    seq_len: int


@dataclass(slots=True)
class WindowMasks:
    """What attending under one sliding window (or none) needs beyond the layout."""

    # Each decode's blocks after its shared prefix (all its blocks when it shares none).
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size]
    # A sliding window would cut into a shared prefix differently for each sequence: only
    # global attention reads shared prefixes once.
    shared_prefixes: SharedPrefixes | None
    prefill_masks: list[torch.Tensor]  # per prefill, [query_len, seq_len] bool, True = attend


@dataclass(slots=True)
class TorchAttentionMetadata(AttentionMetadata):
    layout: BatchLayout
    device: torch.device
    decode_token_index: torch.Tensor  # [num_decodes] rows of the flat batch that decode
    decode_tables: list[list[int]]
    decode_seq_lens: list[int]
    prefills: list[PrefillSlice]
    _masks: dict[int | None, WindowMasks] = field(default_factory=dict)

    def for_window(self, sliding_window: int | None) -> WindowMasks:
        """The masks under `sliding_window`, built by the first layer that asks, then shared."""
        if sliding_window not in self._masks:
            self._masks[sliding_window] = _window_masks(self, sliding_window)
        return self._masks[sliding_window]


class TorchAttentionBackend(AttentionBackend):
    def prepare(self, layout: BatchLayout, device: torch.device) -> TorchAttentionMetadata:
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
            prefills.append(PrefillSlice(starts[i], starts[i + 1], block_ids, seq_len))
        return TorchAttentionMetadata(
            layout=layout,
            device=device,
            decode_token_index=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_tables=decode_tables,
            decode_seq_lens=decode_seq_lens,
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
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        assert isinstance(metadata, TorchAttentionMetadata)
        store_kv_reference(key, value, key_cache, value_cache, metadata.layout.slot_mapping)
        masks = metadata.for_window(sliding_window)
        if not metadata.prefills:
            # Pure decode (the common step): one batched call, no scatter into place.
            return _decode(query, key_cache, value_cache, masks, scale, soft_cap)
        output = torch.empty_like(query)
        if metadata.decode_token_index.numel():
            rows = metadata.decode_token_index
            output[rows] = _decode(query[rows], key_cache, value_cache, masks, scale, soft_cap)
        for piece, mask in zip(metadata.prefills, masks.prefill_masks):
            rows = slice(piece.token_start, piece.token_end)
            output[rows] = _prefill(
                query[rows], key[rows], value[rows], key_cache, value_cache, piece, mask, scale,
                soft_cap,
            )
        return output


def _window_masks(metadata: TorchAttentionMetadata, sliding_window: int | None) -> WindowMasks:
    device, block_size = metadata.device, metadata.layout.block_size
    prefill_masks = []
    for piece in metadata.prefills:
        query_len = piece.token_end - piece.token_start
        query_pos = torch.arange(piece.seq_len - query_len, piece.seq_len, device=device)[:, None]
        key_pos = torch.arange(piece.seq_len, device=device)[None, :]
        prefill_masks.append(_visible(key_pos, query_pos, sliding_window))
    decode_tables, decode_seq_lens = metadata.decode_tables, metadata.decode_seq_lens
    shared = ([] if sliding_window is not None
              else find_shared_prefixes(decode_tables, decode_seq_lens, block_size))
    skipped = [0] * len(decode_tables)
    for rows, num_blocks in shared:
        for row in rows:
            skipped[row] = num_blocks
    suffixes = [table[skip:] for table, skip in zip(decode_tables, skipped)]
    max_blocks = max((len(t) for t in suffixes), default=0)
    tables = torch.tensor(
        [t + [0] * (max_blocks - len(t)) for t in suffixes], dtype=torch.long, device=device
    ).view(len(suffixes), max_blocks)
    offsets = torch.tensor(skipped, device=device)[:, None] * block_size
    key_pos = offsets + torch.arange(max_blocks * block_size, device=device)[None, :]
    query_pos = torch.tensor(decode_seq_lens, device=device)[:, None] - 1
    decode_mask = (_visible(key_pos, query_pos, sliding_window))[:, None, None, :]
    return WindowMasks(
        decode_block_tables=tables,
        decode_mask=decode_mask,
        shared_prefixes=pad_shared_prefixes(shared, decode_tables, decode_mask, block_size, device),
        prefill_masks=prefill_masks,
    )


def _visible(
    key_pos: torch.Tensor, query_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Causal visibility, optionally limited to the last `sliding_window` positions."""
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    masks: WindowMasks,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    if masks.shared_prefixes is not None:
        return cascade_decode(query, key_cache, value_cache, masks.decode_block_tables,
                              masks.shared_prefixes, scale, soft_cap)
    keys = gather_blocks(key_cache, masks.decode_block_tables).to(query.dtype)
    values = gather_blocks(value_cache, masks.decode_block_tables).to(query.dtype)
    out = _attend(
        query[:, :, None, :],  # [num_decodes, heads, 1, dim]
        keys, values, masks.decode_mask, scale, soft_cap,
    )
    return out[:, :, 0, :]


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """Softmax attention of query [..., heads, queries, dim] over keys and values
    [..., kv_heads, keys, dim] (query head h reads KV head h // group), under a boolean mask
    (True = attend) broadcastable to [..., heads, queries, keys]."""
    if soft_cap is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    # Cap the scaled scores, then mask, then softmax, as transformers' eager attention does;
    # all in float32 (in half precision, rounding the capped scores costs accuracy).
    group = query.shape[-3] // keys.shape[-3]
    keys = keys.repeat_interleave(group, dim=-3).float()
    values = values.repeat_interleave(group, dim=-3).float()
    scores = torch.matmul(query.float(), keys.transpose(-1, -2)) * scale
    scores = soft_cap * torch.tanh(scores / soft_cap)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(weights, values).to(query.dtype)


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    piece: PrefillSlice,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    if piece.seq_len == query.shape[0]:
        # A whole prompt: its keys and values are this step's, no need to read them back.
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
    else:
        keys = gather_blocks(key_cache, piece.block_ids)[:, : piece.seq_len].to(query.dtype)
        values = gather_blocks(value_cache, piece.block_ids)[:, : piece.seq_len].to(query.dtype)
    out = _attend(query.transpose(0, 1), keys, values, mask, scale, soft_cap)  # [heads, q, dim]
    return out.transpose(0, 1)
