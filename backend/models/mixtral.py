"""Mixtral (8x7B, 8x22B): Mistral's attention and layers, with a sparse mixture of experts in
place of the MLP: a router's softmax over `num_local_experts` experts, the top
`num_experts_per_tok` (2) kept and renormalized to sum to 1, and each token's output the weighted
sum of its experts' gated SiLU MLPs.

Checkpoints name the feed-forward `block_sparse_moe` and each expert's projections w1 (gate),
w3 (up) and w2 (down); transformers 5 calls the block `mlp` in memory, as this model does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.backend.models.base import ModelContext
from pagoda.backend.models.layers import ExpertNames, SparseMoE, StackedExperts
from pagoda.backend.models.llama import DecoderLayer, LlamaForCausalLM

EXPERT_NAMES = ExpertNames(gate="w1", up="w3", down="w2")


def sparse_moe(ctx: ModelContext, prefix: str) -> SparseMoE:
    config = ctx.config
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for Mixtral's "
                         "experts (only 'silu')")
    num_experts = config.num_local_experts
    return SparseMoE(
        ctx.linear(f"{prefix}.gate", config.hidden_size, num_experts, False),
        StackedExperts(num_experts, config.hidden_size, config.intermediate_size, EXPERT_NAMES),
        top_k=config.num_experts_per_tok,
        renormalize=True,
    )


class MixtralForCausalLM(LlamaForCausalLM):
    def make_layer(self, ctx: ModelContext, index: int) -> nn.Module:
        prefix = f"layers.{index}"
        return DecoderLayer(ctx, prefix, mlp=sparse_moe(ctx, f"{prefix}.mlp"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(
            (name.replace(".block_sparse_moe.", ".mlp."), tensor) for name, tensor in weights
        )
