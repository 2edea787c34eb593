"""StableLM (StableLmForCausalLM: StableLM-3B-4E1T, StableLM 2 1.6B and 12B, their chat and
Zephyr fine-tunes) on the paged KV cache.

Llama's gated MLP and q/k/v projections with LayerNorms instead of RMSNorms, partial rotary
(25% of each head), optional q/k/v biases (`use_qkv_bias`), an optional LayerNorm per head of q
and k (`qk_layernorm`, StableLM 2 12B) and an optional parallel residual
(`use_parallel_residual`: attention and MLP both read the same normalized input).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import (
    LayerNorm,
    Linear,
    PerHeadLayerNorm,
    RotaryAngles,
    RotaryEmbedding,
    activation,
    apply_rotary,
    load_checkpoint,
)


class StableLmAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size},
            config.use_qkv_bias,
        )
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size, False)
        self.q_layernorm: PerHeadLayerNorm | None = None
        self.k_layernorm: PerHeadLayerNorm | None = None
        if config.qk_layernorm:
            eps = config.layer_norm_eps
            self.q_layernorm = PerHeadLayerNorm(self.num_heads, self.head_dim, eps)
            self.k_layernorm = PerHeadLayerNorm(self.num_kv_heads, self.head_dim, eps)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5

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
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_layernorm is not None and self.k_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(query, key, value, *kv_cache, metadata, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class StableLmMLP(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = ctx.linear(
            f"{prefix}.gate_up_proj", config.hidden_size,
            {"gate_proj": self.intermediate_size, "up_proj": self.intermediate_size}, False,
        )
        self.down_proj = ctx.linear(f"{prefix}.down_proj", self.intermediate_size,
                                    config.hidden_size, False)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class StableLmDecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = StableLmAttention(ctx, f"{prefix}.self_attn")
        self.mlp = StableLmMLP(ctx, f"{prefix}.mlp")
        # The parallel residual feeds the MLP the input norm's output: no second norm.
        self.post_attention_layernorm = (
            None if self.use_parallel_residual
            else LayerNorm(config.hidden_size, config.layer_norm_eps)
        )

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        attn = self.self_attn(angles, normed, kv_cache, metadata)
        if self.post_attention_layernorm is None:
            return hidden + attn + self.mlp(normed)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class StableLmForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            StableLmDecoderLayer(ctx, f"layers.{index}")
            for index in range(config.num_hidden_layers)
        )
        head_dim = self.layers[0].self_attn.head_dim
        rotary_dim = int(head_dim * config.rope_parameters["partial_rotary_factor"])
        self.rotary = RotaryEmbedding(config, rotary_dim, ctx.max_positions)
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def attention_backend(self) -> AttentionBackend:
        return self.layers[0].self_attn.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        angles = self.rotary(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(angles, hidden, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            return "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")

        load_checkpoint(self, weights, _checkpoint_name, skip)


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"model.{path}"
