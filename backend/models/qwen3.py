"""Qwen3 (dense): the Llama architecture with an RMSNorm over each head of q and of k, applied
before the rotary embedding, as transformers' Qwen3Attention does. Qwen3-MoE (qwen3_moe.py)
attends the same way."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import RMSNorm, RotaryAngles, apply_rotary
from pagoda.backend.models.llama import DecoderLayer, LlamaForCausalLM


class Qwen3Attention(nn.Module):
    """Llama's attention with per-head q/k RMSNorm (one weight of head_dim shared by all heads,
    unlike OLMo's norm over the whole q), and `attention_bias` biasing o_proj as well as
    q/k/v."""

    def __init__(self, ctx: ModelContext, prefix: str, *, sliding_window: int | None) -> None:
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
        self.sliding_window = sliding_window

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


class Qwen3ForCausalLM(LlamaForCausalLM):
    def make_layer(self, ctx: ModelContext, index: int) -> nn.Module:
        prefix = f"layers.{index}"
        window = _sliding_window(ctx.config)
        attention = Qwen3Attention(ctx, f"{prefix}.self_attn", sliding_window=window)
        return DecoderLayer(ctx, prefix, attention)


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The window of every layer, or None. Released Qwen3 checkpoints attend fully everywhere;
    use_sliding_window=True windows the layers from max_window_layers on (`layer_types`), which
    one model-wide window expresses only when that is all of them or none."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    windowed = [index for index, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if not windowed:
        return None  # NOTE: a config may name a sliding_window that no layer uses
    if len(windowed) < len(layer_types):
        raise ValueError(
            f"Qwen3ForCausalLM: layer_types makes only layers {windowed} sliding-window layers "
            "(use_sliding_window with max_window_layers); a window for some layers and not "
            "others is not supported"
        )
    return config.sliding_window
