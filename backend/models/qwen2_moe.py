"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases per
`qkv_bias`) over layers whose feed-forward is either a sparse mixture of experts or a dense MLP.

- The sparse block: a router's softmax over `num_experts`, the top `num_experts_per_tok` kept
  (renormalized to sum to 1 only when `norm_topk_prob`), plus a shared expert (a dense gated MLP
  of `shared_expert_intermediate_size`) that every token goes through, scaled by
  sigmoid(shared_expert_gate(x)).
- Layer i is sparse unless it is listed in `mlp_only_layers`, and only every
  `decoder_sparse_step`-th layer is ((i + 1) % step == 0); the others have a dense MLP of
  `intermediate_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.models.base import ModelContext
from pagoda.backend.models.layers import ExpertNames, Linear, SparseMoE, StackedExperts
from pagoda.backend.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM


def is_sparse_layer(config: PretrainedConfig, index: int) -> bool:
    """Whether layer `index` has experts (Qwen2-MoE's and Qwen3-MoE's rule)."""
    return (index not in (config.mlp_only_layers or []) and config.num_experts > 0
            and (index + 1) % config.decoder_sparse_step == 0)


def routed_experts(ctx: ModelContext, prefix: str) -> tuple[Linear, StackedExperts]:
    """The router and experts of a Qwen MoE layer (Qwen2-MoE and Qwen3-MoE name them alike)."""
    config = ctx.config
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for the experts of "
                         f"{config.model_type} (only 'silu')")
    gate = ctx.linear(f"{prefix}.gate", config.hidden_size, config.num_experts, False)
    experts = StackedExperts(
        config.num_experts, config.hidden_size, config.moe_intermediate_size, ExpertNames()
    )
    return gate, experts


class SharedExpertMoE(SparseMoE):
    """The routed experts plus a shared expert every token takes, gated per token."""

    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        config = ctx.config
        super().__init__(*routed_experts(ctx, prefix), top_k=config.num_experts_per_tok,
                         renormalize=config.norm_topk_prob)
        self.shared_expert = MLP(
            ctx, f"{prefix}.shared_expert", config.shared_expert_intermediate_size
        )
        self.shared_expert_gate = ctx.linear(
            f"{prefix}.shared_expert_gate", config.hidden_size, 1, False
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shared = F.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden)
        return super().forward(hidden) + shared


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    def make_layer(self, ctx: ModelContext, index: int) -> nn.Module:
        prefix = f"layers.{index}"
        attention = Attention(ctx, f"{prefix}.self_attn", qkv_bias=ctx.config.qkv_bias,
                              sliding_window=_sliding_window(ctx.config))
        mlp = (SharedExpertMoE(ctx, f"{prefix}.mlp") if is_sparse_layer(ctx.config, index)
               else MLP(ctx, f"{prefix}.mlp"))
        return DecoderLayer(ctx, prefix, attention, mlp)


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The window every layer attends within, or None. transformers gives each layer a type
    (`layer_types`); with use_sliding_window it alternates sliding and full layers, which this
    family does not wire per layer yet (Gemma's layers show how: each passes its own window)."""
    layer_types = set(config.layer_types)
    if layer_types == {"full_attention"}:
        return None
    if layer_types == {"sliding_attention"}:
        return config.sliding_window
    raise ValueError(
        f"layer_types mixes {sorted(layer_types)} (use_sliding_window with max_window_layers): "
        "per-layer sliding windows are not supported for Qwen2MoeForCausalLM"
    )
