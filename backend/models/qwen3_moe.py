"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): dense Qwen3's attention, an
RMSNorm over each head of q and of k before the rotary embedding, over layers whose feed-forward
is a sparse mixture of experts (no shared expert; top-k weights renormalized when
`norm_topk_prob`) or, per `mlp_only_layers` and `decoder_sparse_step` as in Qwen2-MoE, a dense
MLP.
"""

from __future__ import annotations

from torch import nn

from pagoda.backend.models.base import ModelContext
from pagoda.backend.models.layers import SparseMoE
from pagoda.backend.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from pagoda.backend.models.qwen2_moe import is_sparse_layer, routed_experts
from pagoda.backend.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    def make_layer(self, ctx: ModelContext, index: int) -> nn.Module:
        config = ctx.config
        prefix = f"layers.{index}"
        if is_sparse_layer(config, index):
            mlp: nn.Module = SparseMoE(*routed_experts(ctx, f"{prefix}.mlp"),
                                       top_k=config.num_experts_per_tok,
                                       renormalize=config.norm_topk_prob)
        else:
            mlp = MLP(ctx, f"{prefix}.mlp")
        # Qwen3-MoE's config clears sliding_window unless use_sliding_window; then every layer
        # attends within it, as in transformers (it has no layer_types).
        attention = Qwen3Attention(ctx, f"{prefix}.self_attn", sliding_window=config.sliding_window)
        return DecoderLayer(ctx, prefix, attention, mlp)
