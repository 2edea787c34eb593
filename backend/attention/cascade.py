"""Cascade attention for the torch backend: decodes whose block tables start with the same blocks
(the samples or beams of one request, requests hitting one cached prefix) attend to that shared
prefix together, its keys and values read once for all of them; each one's own suffix is
attended to separately, and the two softmax halves are merged by their log-sum-exp."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def find_shared_prefixes(
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


def pad_shared_prefixes(
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
        bias=additive_mask(mask[:, None, None, :]),
        suffix_bias=additive_mask(decode_mask),
    )


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) as float32 scores to add: 0 or -inf."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., num_blocks] block ids -> [..., num_kv_heads, num_blocks * block_size, head_dim]."""
    # index_select, not cache[block_ids]: on CPU advanced indexing copied 4-6x slower.
    blocks = cache.index_select(0, block_ids.flatten()).view(*block_ids.shape, *cache.shape[1:])
    tokens = blocks.flatten(-4, -3)  # [..., num_blocks * block_size, heads, dim]
    return tokens.transpose(-3, -2)


def cascade_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    suffix_tables: torch.Tensor,
    shared: SharedPrefixes,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """Decode attention, query [num_decodes, heads, dim], over each decode's blocks after its
    shared prefix (`suffix_tables` [num_decodes, max_blocks]) and the shared prefixes."""
    num_decodes, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[-2]
    group = num_heads // num_kv_heads
    # Query head h reads key/value head h // group.
    queries = query.view(num_decodes, num_kv_heads, group, head_dim).float()
    output, lse = attend_with_lse(
        queries,
        gather_blocks(key_cache, suffix_tables).float(),  # [decodes, kv_heads, keys, dim]
        gather_blocks(value_cache, suffix_tables).float(),
        shared.suffix_bias,  # [decodes, 1, 1, keys]
        scale,
        soft_cap,
    )
    num_sets, set_size = shared.rows.shape
    # [num_sets, kv_heads, set_size * group, dim]: every set's queries against its prefix.
    set_queries = queries[shared.rows].transpose(1, 2).flatten(2, 3)
    prefix_output, prefix_lse = attend_with_lse(
        set_queries,
        # [num_sets, kv_heads, tokens, dim]
        gather_blocks(key_cache, shared.block_tables).float(),
        gather_blocks(value_cache, shared.block_tables).float(),
        shared.bias,
        scale,
        soft_cap,
    )
    shape = (num_sets, num_kv_heads, set_size, group)
    prefix_output = prefix_output.view(*shape, head_dim).transpose(1, 2)[shared.is_member]
    prefix_lse = prefix_lse.view(shape).transpose(1, 2)[shared.is_member]
    rows = shared.rows[shared.is_member]
    output[rows], lse[rows] = _merge(output[rows], lse[rows], prefix_output, prefix_lse)
    return output.reshape(num_decodes, num_heads, head_dim).to(query.dtype)


def attend_with_lse(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns each query's log-sum-exp of scores, so partial
    results over disjoint keys can be merged. float32 query [batch, heads, queries, dim], keys
    and values [batch, heads, keys, dim], bias broadcastable to [batch, heads, queries, keys]
    (see additive_mask); every query must see at least one key."""
    if query.device.type == "cpu" and soft_cap is None:
        # PyTorch's fused CPU attention computes the log-sum-exp anyway and returns it: one
        # call instead of the eight below (the cascade's share of a decode step fell by a third).
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, attn_mask=bias, scale=scale
        )
    return attend_with_lse_unfused(query, keys, values, bias, scale, soft_cap)


def attend_with_lse_unfused(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    soft_cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if soft_cap is not None:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    scores = scores + bias
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


