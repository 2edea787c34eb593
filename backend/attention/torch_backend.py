"""Reference attention in plain torch: gather each sequence's blocks, then SDPA.

Sequences decoding one token are batched into one SDPA call over their padded contexts;
sequences feeding several tokens (prefill chunks) each get their own call with an offset causal
mask, since their query lengths differ (a whole prompt uses its new keys and values as they are).

Decoding sequences whose tables start with the same blocks (the samples or beams of one request,
requests hitting one cached prefix) attend to that shared prefix together: its keys and values
are read once for all of them, then each one's own suffix is attended to separately, and the two
softmax halves are merged by their log-sum-exp (cascade attention). Without this, sharing saves
KV memory but every sample still pays the full context in every step.
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
class SharedPrefixes:
    """Leading blocks that sets of decoding sequences hold in common, padded to one batch."""

    # Each set's decodes (indices among the step's decodes), padded by repeating its first.
    rows: torch.Tensor  # [num_sets, max_set_size]
    is_member: torch.Tensor  # [num_sets, max_set_size] bool, False on padding
    block_tables: torch.Tensor  # [num_sets, max_blocks]
    # Additive float32 masks (0 to attend, -inf not to): past each set's prefix, and past each
    # decode's own tokens (its decode_mask).
    bias: torch.Tensor  # [num_sets, 1, 1, max_blocks * block_size]
    suffix_bias: torch.Tensor  # [num_decodes, 1, 1, decode keys]


@dataclass(slots=True)
class TorchAttentionMetadata(AttentionMetadata):
    layout: BatchLayout
    decode_token_index: torch.Tensor  # [num_decodes] rows of the flat batch that decode
    # Each decode's blocks after its shared prefix (all its blocks when it shares none).
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_blocks * block_size]
    shared_prefixes: SharedPrefixes | None
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
        # A sliding window would cut into the shared prefix differently for each sequence.
        shared = [] if sliding_window else _shared_prefixes(decode_tables, decode_seq_lens,
                                                           layout.block_size)
        skipped = [0] * len(decode_tables)
        for rows, num_blocks in shared:
            for row in rows:
                skipped[row] = num_blocks
        suffixes = [table[skip:] for table, skip in zip(decode_tables, skipped)]
        max_blocks = max((len(t) for t in suffixes), default=0)
        tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in suffixes], dtype=torch.long, device=device
        ).view(len(suffixes), max_blocks)
        offsets = torch.tensor(skipped, device=device)[:, None] * layout.block_size
        key_pos = offsets + torch.arange(max_blocks * layout.block_size, device=device)[None, :]
        query_pos = torch.tensor(decode_seq_lens, device=device)[:, None] - 1
        decode_mask = (_visible(key_pos, query_pos, sliding_window))[:, None, None, :]
        return TorchAttentionMetadata(
            layout=layout,
            decode_token_index=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_block_tables=tables,
            decode_mask=decode_mask,
            shared_prefixes=_pad_shared(shared, decode_tables, decode_mask, layout.block_size,
                                        device),
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
            rows = slice(piece.token_start, piece.token_end)
            output[rows] = _prefill(
                query[rows], key[rows], value[rows], key_cache, value_cache, piece, scale
            )
        return output


def _shared_prefixes(
    tables: list[list[int]], seq_lens: list[int], block_size: int
) -> list[tuple[list[int], int]]:
    """Sets of decodes (as row indices) whose tables start with the same blocks, with how many
    they share. Only blocks before each one's last are counted: a sequence's last block is its
    own, since writing into a shared one copies it first."""
    by_first_block: dict[int, list[int]] = {}
    for row, (table, seq_len) in enumerate(zip(tables, seq_lens)):
        if seq_len > block_size:
            by_first_block.setdefault(table[0], []).append(row)
    shared = []
    for rows in by_first_block.values():
        if len(rows) < 2:
            continue
        first = tables[rows[0]]
        num_blocks = min((seq_lens[row] - 1) // block_size for row in rows)
        for row in rows[1:]:
            table = tables[row]
            common = 0
            while common < num_blocks and table[common] == first[common]:
                common += 1
            num_blocks = common
        if num_blocks:
            shared.append((rows, num_blocks))
    return shared


def _pad_shared(
    shared: list[tuple[list[int], int]],
    tables: list[list[int]],
    decode_mask: torch.Tensor,
    block_size: int,
    device: torch.device,
) -> SharedPrefixes | None:
    if not shared:
        return None
    set_size = max(len(rows) for rows, _ in shared)
    max_blocks = max(num_blocks for _, num_blocks in shared)
    rows = [members + members[:1] * (set_size - len(members)) for members, _ in shared]
    is_member = [[i < len(members) for i in range(set_size)] for members, _ in shared]
    prefix_tables = [
        tables[members[0]][:num_blocks] + [0] * (max_blocks - num_blocks)
        for members, num_blocks in shared
    ]
    lengths = torch.tensor([num_blocks * block_size for _, num_blocks in shared], device=device)
    mask = torch.arange(max_blocks * block_size, device=device)[None, :] < lengths[:, None]
    return SharedPrefixes(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        is_member=torch.tensor(is_member, dtype=torch.bool, device=device),
        block_tables=torch.tensor(prefix_tables, dtype=torch.long, device=device),
        bias=_additive(mask[:, None, None, :]),
        suffix_bias=_additive(decode_mask),
    )


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) as float32 scores to add: 0 or -inf."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


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
    # index_select, not cache[block_ids]: on CPU advanced indexing copied 4-6x slower.
    blocks = cache.index_select(0, block_ids.flatten()).view(*block_ids.shape, *cache.shape[1:])
    tokens = blocks.flatten(-4, -3)  # [..., num_blocks * block_size, heads, dim]
    return tokens.transpose(-3, -2)


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: TorchAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if metadata.shared_prefixes is not None:
        return _cascade_decode(query, key_cache, value_cache, metadata, scale)
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


def _cascade_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: TorchAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Decode attention with shared prefixes read once (see the module docstring)."""
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[-2]
    group = num_heads // num_kv_heads
    # Query head h reads key/value head h // group.
    queries = query.view(num_decodes, num_kv_heads, group, head_dim).float()
    output, lse = _attend_with_lse(
        queries,
        _gather(key_cache, metadata.decode_block_tables).float(),  # [decodes, kv_heads, keys, dim]
        _gather(value_cache, metadata.decode_block_tables).float(),
        metadata.shared_prefixes.suffix_bias,  # [decodes, 1, 1, keys]
        scale,
    )
    shared = metadata.shared_prefixes
    num_sets, set_size = shared.rows.shape
    # [num_sets, kv_heads, set_size * group, dim]: every set's queries against its prefix.
    set_queries = queries[shared.rows].transpose(1, 2).flatten(2, 3)
    prefix_output, prefix_lse = _attend_with_lse(
        set_queries,
        _gather(key_cache, shared.block_tables).float(),  # [num_sets, kv_heads, tokens, dim]
        _gather(value_cache, shared.block_tables).float(),
        shared.bias,
        scale,
    )
    shape = (num_sets, num_kv_heads, set_size, group)
    prefix_output = prefix_output.view(*shape, head_dim).transpose(1, 2)[shared.is_member]
    prefix_lse = prefix_lse.view(shape).transpose(1, 2)[shared.is_member]
    rows = shared.rows[shared.is_member]
    output[rows], lse[rows] = _merge(output[rows], lse[rows], prefix_output, prefix_lse)
    return output.reshape(num_decodes, num_heads, head_dim).to(query.dtype)


def _attend_with_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns each query's log-sum-exp of scores, so partial
    results over disjoint keys can be merged. float32 query [batch, heads, queries, dim], keys
    and values [batch, heads, keys, dim], bias broadcastable to [batch, heads, queries, keys]
    (see _additive); every query must see at least one key."""
    if query.device.type == "cpu":
        # PyTorch's fused CPU attention computes the log-sum-exp anyway and returns it: one
        # call instead of the eight below (the cascade's share of a decode step fell by a third).
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, attn_mask=bias, scale=scale
        )
    return _attend_with_lse_unfused(query, keys, values, bias, scale)


def _attend_with_lse_unfused(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale + bias
    # Every query sees at least one key, so the row maximum is finite.
    peak = scores.amax(dim=-1, keepdim=True)
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    output = torch.matmul(weights, values) / total
    return output, (peak + torch.log(total)).squeeze(-1)


def _merge(
    output_a: torch.Tensor, lse_a: torch.Tensor, output_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets, from the attention over each."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return weight_a * output_a + weight_b * output_b, lse


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    piece: PrefillSlice,
    scale: float,
) -> torch.Tensor:
    if piece.seq_len == query.shape[0]:
        # A whole prompt: its keys and values are this step's, no need to read them back.
        keys, values = key.transpose(0, 1), value.transpose(0, 1)
    else:
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
