"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): dense Qwen3's attention, an
RMSNorm over each head of q and of k before the rotary embedding, over layers whose feed-forward
is a sparse mixture of experts (no shared expert; top-k weights renormalized when
`norm_topk_prob`) or, per `mlp_only_layers` and `decoder_sparse_step` as in Qwen2-MoE, a dense
MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.backend.attention import AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import RMSNorm, RotaryAngles, SparseMoE, apply_rotary
from pagoda.backend.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from pagoda.backend.models.qwen2_moe import is_sparse_layer, routed_experts


class Qwen3MoeAttention(nn.Module):
    """Llama's attention with per-head q/k RMSNorm (one weight of head_dim shared by all heads),
    and `attention_bias` biasing o_proj as well as q/k/v."""

    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size}, bias,
        )
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size, bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5
        # None unless use_sliding_window (the config clears it), then every layer's.
        self.sliding_window = config.sliding_window

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1
        )
        query = self.q_norm(query.view(num_tokens, self.num_heads, self.head_dim))
        key = self.k_norm(key.view(num_tokens, self.num_kv_heads, self.head_dim))
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(
            query, key, value, *kv_cache, metadata, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


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
        return DecoderLayer(ctx, prefix, Qwen3MoeAttention(ctx, f"{prefix}.self_attn"), mlp)
