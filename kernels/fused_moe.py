"""Mixture-of-experts feed-forward over routed tokens, pure torch: the CPU path and the reference
the Triton kernel is tested against.

Every token goes through the `top_k` experts its router chose; expert e is a gated SiLU MLP whose
weights are slices of stacked tensors: `gate_up[e]` [2 * intermediate, hidden] (gate rows first,
then up rows) and `down[e]` [hidden, intermediate]. A token's output is the sum over its chosen
experts of the routing weight times that expert's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_reference(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """hidden [num_tokens, hidden]; topk_weights (float32) and topk_ids [num_tokens, top_k].
    Returns [num_tokens, hidden] in the hidden states' dtype.

    The (token, choice) pairs are sorted by expert so that each expert runs one matrix product
    over all of its rows: a loop over experts, never over tokens.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = gate_up.shape[0]
    flat_ids = topk_ids.flatten()
    # NOTE: a stable sort keeps each expert's rows in token order, so results do not depend on
    # how the sort breaks ties.
    order = flat_ids.argsort(stable=True)
    rows = hidden[order // top_k]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    expert_out = torch.empty(rows.shape[0], down.shape[1], dtype=hidden.dtype, device=hidden.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        segment = slice(start, start + count)
        gate, up = F.linear(rows[segment], gate_up[expert]).chunk(2, dim=-1)
        expert_out[segment] = F.linear(F.silu(gate) * up, down[expert])
        start += count
    # Weighted in float32 and summed there over each token's choices, in choice order, as
    # transformers' grouped experts do.
    weighted = expert_out.float() * topk_weights.flatten()[order, None].float()
    pairs = torch.empty_like(weighted)
    pairs[order] = weighted
    return pairs.view(num_tokens, top_k, down.shape[1]).sum(dim=1).to(hidden.dtype)
