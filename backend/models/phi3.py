"""Phi-3 (Phi-3 mini/medium 4k and 128k, Phi-3.5-mini, Phi-4-mini) on the paged KV cache.

A Llama-shaped decoder whose checkpoints store q/k/v as one `qkv_proj` and gate/up as one
`gate_up_proj` (loaded as they are: one tensor each), with optional partial rotary (Phi-4-mini)
and LongRoPE for the 128k models: the short or the long frequencies by the sequence's length, a
per-token choice the engine passes as `long_context` (see LongRopeEmbedding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import (
    Linear,
    LongRopeEmbedding,
    RMSNorm,
    RotaryAngles,
    RotaryEmbedding,
    activation,
    apply_rotary,
    load_checkpoint,
)


class Phi3Attention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ctx.linear(f"{prefix}.qkv_proj", config.hidden_size,
                                   self.q_size + 2 * self.kv_size, False)
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size, False)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5
        self.sliding_window: int | None = getattr(config, "sliding_window", None)

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
        query = apply_rotary(query.view(num_tokens, self.num_heads, self.head_dim), angles)
        key = apply_rotary(key.view(num_tokens, self.num_kv_heads, self.head_dim), angles)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(
            query, key, value, *kv_cache, metadata, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Phi3MLP(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = ctx.linear(f"{prefix}.gate_up_proj", config.hidden_size,
                                       2 * self.intermediate_size, False)
        self.down_proj = ctx.linear(f"{prefix}.down_proj", self.intermediate_size,
                                    config.hidden_size, False)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Phi3Attention(ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Phi3MLP(ctx, f"{prefix}.mlp")

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Phi3ForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Phi3DecoderLayer(ctx, f"layers.{index}") for index in range(config.num_hidden_layers)
        )
        head_dim = self.layers[0].self_attn.head_dim
        rotary_dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        rope_type = config.rope_parameters.get("rope_type", "default")
        rotary = LongRopeEmbedding if rope_type == "longrope" else RotaryEmbedding
        self.rotary = rotary(config, rotary_dim, ctx.max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def long_context_threshold(self) -> int | None:
        """With LongRoPE: the length past which a sequence is computed with the long factors
        (the engine then passes `long_context` and recomputes sequences that cross it)."""
        if isinstance(self.rotary, LongRopeEmbedding):
            return self.rotary.long_context_threshold
        return None

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
        long_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if isinstance(self.rotary, LongRopeEmbedding):
            angles = self.rotary(positions, hidden.dtype, long_context)
        else:
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
