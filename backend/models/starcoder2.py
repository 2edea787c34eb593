"""StarCoder2 (3B, 7B, 15B and their instruct fine-tunes) reading and writing the paged KV cache.

A Llama-shaped decoder with GQA and rotary embeddings, but LayerNorm with a bias, biases on every
projection (`use_bias`), a plain (non-gated) GELU MLP with GPT-2's names (c_fc, c_proj), and a
sliding window on every layer when the config sets one. Numerics follow transformers'
implementation, so float32 outputs match it token for token.
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
    PlainMLP,
    RotaryAngles,
    RotaryEmbedding,
    activation,
    apply_rotary,
    load_checkpoint,
)


class Starcoder2Attention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size},
            config.use_bias,
        )
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size,
                                 config.use_bias)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5
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
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(
            query, key, value, *kv_cache, metadata, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class Starcoder2DecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.input_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.self_attn = Starcoder2Attention(ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.norm_epsilon)
        self.mlp = PlainMLP(
            ctx, f"{prefix}.mlp", config.hidden_size, config.intermediate_size,
            activation(config.hidden_act, "hidden_act"), config.use_bias,
        )

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Starcoder2ForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Starcoder2DecoderLayer(ctx, f"layers.{index}")
            for index in range(config.num_hidden_layers)
        )
        attn = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(config, attn.head_dim, ctx.max_positions)
        self.norm = LayerNorm(config.hidden_size, config.norm_epsilon)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every layer attends with (prepare its metadata with this one)."""
        return self.layers[0].self_attn.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the cache this model needs."""
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch of new tokens."""
        hidden = self.embed_tokens(input_ids)
        angles = self.rotary(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(angles, hidden, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors, named as in transformers, into the parameters; q/k/v are
        stored fused here, each checkpoint tensor filling its band of rows."""
        tied = self.config.tie_word_embeddings
        load_checkpoint(
            self, weights, _checkpoint_name, skip=lambda name: tied and name == "lm_head.weight"
        )


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"model.{path}"
