"""Fused mixture-of-experts (Triton): grouped matrix products over tokens sorted by expert.

Same contract as `pagoda.kernels.fused_moe_reference`. The (token, choice) pairs are sorted by
the expert they chose and each expert's run is padded to whole blocks of BLOCK_M rows
(`sort_by_expert`), so every program multiplies one block of rows by one expert's weights:

1. `_moe_gate_up_kernel`: rows of hidden states x the expert's gate and up weights, both accumulated
   in the same program, and silu(gate) * up stored per pair (the intermediate activations);
2. `_moe_down_kernel`: the activations x the expert's down weights, times the pair's routing weight,
   stored per pair in float32; each token then sums its top_k pairs.

The sort runs on the device with fixed-size outputs (an upper bound of blocks; blocks past the
last expert's exit at once), so nothing waits for the host and a CUDA graph can replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton.launch import dot_dtype, require_unit_stride

# Output features per program, and the reduction step; tl.dot needs every dimension >= 16.
BLOCK_N = 64
BLOCK_K = 32
# Rows per block: small when few tokens spread over many experts (decode), so that padding
# each expert's run to whole blocks wastes little; larger for prefill.
SMALL_BLOCK_M = 16
LARGE_BLOCK_M = 64


@dataclass(frozen=True, slots=True)
class ExpertBlocks:
    """The (token, choice) pairs in expert order, padded to whole blocks per expert.

    pair_ids [num_blocks * block_m] int32: pair p = token * top_k + choice, or num_pairs in a
    padding row. block_expert [num_blocks] int32: the expert of each block's rows, or
    num_experts for a block past the last expert's (its program does nothing).
    """

    pair_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int


def block_rows(num_tokens: int, num_experts: int) -> int:
    """Rows per block for a step of `num_tokens` tokens."""
    return SMALL_BLOCK_M if num_tokens <= num_experts else LARGE_BLOCK_M


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the pairs of topk_ids [num_tokens, top_k] by expert, each group padded to a
    multiple of block_m rows, on topk_ids' device."""
    device = topk_ids.device
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    # NOTE: each expert that has rows wastes less than one block, and at most min(num_experts,
    # num_pairs) experts have rows: a bound that depends on shapes only, never on the routing.
    num_blocks = triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    # NOTE: scatter_add_ rather than bincount, which reads its maximum back to the host.
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first_row = padded_end - padded  # of each expert's run in the padded order
    first_sorted = counts.cumsum(0) - counts  # of each expert's run in the sorted order
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=device) - first_sorted[sorted_experts]
    pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    pair_ids[first_row[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return ExpertBlocks(pair_ids, block_expert, block_m)


# The number of pairs changes every step: not specialized on, so it compiles one variant.
@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gate_up_kernel(
    hidden_ptr, gate_up_ptr, out_ptr, pair_ids_ptr, block_expert_ptr,
    num_pairs, num_experts, hidden_size, intermediate_size,
    stride_hidden_token, stride_weight_expert, stride_weight_row, stride_out_pair,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < intermediate_size
    weights = gate_up_ptr + expert.to(tl.int64) * stride_weight_expert
    # Gate rows are 0..intermediate_size, up rows follow them.
    gate_rows = cols.to(tl.int64) * stride_weight_row
    up_rows = (cols + intermediate_size).to(tl.int64) * stride_weight_row
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < hidden_size
        rows = tl.load(
            hidden_ptr + tokens[:, None] * stride_hidden_token + ks[None, :],
            mask=row_valid[:, None] & k_valid[None, :], other=0.0,
        ).to(tl.float32).to(DOT_DTYPE)
        weight_mask = k_valid[:, None] & col_valid[None, :]
        gate_weights = tl.load(weights + gate_rows[None, :] + ks[:, None], mask=weight_mask,
                               other=0.0).to(tl.float32).to(DOT_DTYPE)
        up_weights = tl.load(weights + up_rows[None, :] + ks[:, None], mask=weight_mask,
                             other=0.0).to(tl.float32).to(DOT_DTYPE)
        gate = tl.dot(rows, gate_weights, gate, input_precision="ieee")
        up = tl.dot(rows, up_weights, up, input_precision="ieee")
    activations = gate * tl.sigmoid(gate) * up
    tl.store(
        out_ptr + pairs.to(tl.int64)[:, None] * stride_out_pair + cols[None, :],
        activations.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & col_valid[None, :],
    )


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_kernel(
    activations_ptr, down_ptr, out_ptr, pair_ids_ptr, block_expert_ptr, routing_weights_ptr,
    num_pairs, num_experts, hidden_size, intermediate_size,
    stride_activations_pair, stride_weight_expert, stride_weight_row, stride_out_pair,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert >= num_experts:
        return
    pairs = tl.load(pair_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_valid = pairs < num_pairs
    pair_rows = pairs.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < hidden_size
    weight_rows = (down_ptr + expert.to(tl.int64) * stride_weight_expert
                   + cols.to(tl.int64) * stride_weight_row)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_start in range(0, intermediate_size, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < intermediate_size
        rows = tl.load(
            activations_ptr + pair_rows[:, None] * stride_activations_pair + ks[None, :],
            mask=row_valid[:, None] & k_valid[None, :], other=0.0,
        ).to(tl.float32).to(DOT_DTYPE)
        weights = tl.load(weight_rows[None, :] + ks[:, None],
                          mask=k_valid[:, None] & col_valid[None, :],
                          other=0.0).to(tl.float32).to(DOT_DTYPE)
        acc = tl.dot(rows, weights, acc, input_precision="ieee")
    routing = tl.load(routing_weights_ptr + pairs, mask=row_valid, other=0.0)
    tl.store(
        out_ptr + pair_rows[:, None] * stride_out_pair + cols[None, :],
        acc * routing[:, None],
        mask=row_valid[:, None] & col_valid[None, :],
    )


def fused_moe_triton(
    hidden: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `fused_moe_reference`: hidden [num_tokens, hidden], gate_up
    [num_experts, 2 * intermediate, hidden], down [num_experts, hidden, intermediate],
    topk_weights and topk_ids [num_tokens, top_k]. Returns [num_tokens, hidden] in the hidden
    states' dtype."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden_size, intermediate_size = down.shape
    if gate_up.shape != (num_experts, 2 * intermediate_size, hidden_size):
        raise ValueError(f"gate_up has shape {tuple(gate_up.shape)}, expected "
                         f"{(num_experts, 2 * intermediate_size, hidden_size)} to match down")
    if num_tokens == 0:
        return torch.empty_like(hidden)
    require_unit_stride(hidden=hidden, gate_up=gate_up, down=down)
    num_pairs = num_tokens * top_k
    blocks = sort_by_expert(topk_ids, num_experts, block_rows(num_tokens, num_experts))
    num_blocks = blocks.block_expert.numel()
    operand = dot_dtype(gate_up)
    activations = hidden.new_empty(num_pairs, intermediate_size)
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(intermediate_size, BLOCK_N))](
        hidden, gate_up, activations, blocks.pair_ids, blocks.block_expert,
        num_pairs, num_experts, hidden_size, intermediate_size,
        hidden.stride(0), gate_up.stride(0), gate_up.stride(1), activations.stride(0),
        TOP_K=top_k, BLOCK_M=blocks.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_DTYPE=operand,
    )
    weighted = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden_size, BLOCK_N))](
        activations, down, weighted, blocks.pair_ids, blocks.block_expert,
        topk_weights.float().contiguous(),
        num_pairs, num_experts, hidden_size, intermediate_size,
        activations.stride(0), down.stride(0), down.stride(1), weighted.stride(0),
        BLOCK_M=blocks.block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_DTYPE=operand,
    )
    # Each token's choices summed in float32, in choice order, as the reference does.
    return weighted.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden.dtype)
