"""GPT-BigCode (StarCoder, StarCoderBase, SantaCoder, WizardCoder, OctoCoder) reading and writing
the paged KV cache.

GPT-2's shape: learned absolute position embeddings added to the token embeddings, LayerNorm
before attention and before the MLP, a plain GELU MLP, biases everywhere. Attention is
multi-query (`multi_query`, the default: one key/value head shared by every query head), with
q, k and v in one fused `c_attn` projection: [queries | key | value] for multi-query, and per
head [q | k | v] otherwise. Numerics follow transformers' implementation, so float32 outputs
match it token for token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import (
    LayerNorm,
    Linear,
    PlainMLP,
    activation,
    load_checkpoint,
)


class GPTBigCodeAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.multi_query = config.multi_query
        self.num_kv_heads = 1 if self.multi_query else self.num_heads
        self.kv_size = self.num_kv_heads * self.head_dim
        self.c_attn = ctx.linear(
            f"{prefix}.c_attn", self.hidden_size, self.hidden_size + 2 * self.kv_size, True
        )
        self.c_proj = ctx.linear(f"{prefix}.c_proj", self.hidden_size, self.hidden_size, True)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0

    def forward(
        self, hidden: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.c_attn(hidden)
        if self.multi_query:
            query, key, value = qkv.split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
            query = query.view(num_tokens, self.num_heads, self.head_dim)
            key = key.view(num_tokens, 1, self.head_dim)
            value = value.view(num_tokens, 1, self.head_dim)
        else:
            per_head = qkv.view(num_tokens, self.num_heads, 3 * self.head_dim)
            query, key, value = per_head.split(self.head_dim, dim=-1)
        out = self.backend.forward(query, key, value, *kv_cache, metadata, self.scale)
        return self.c_proj(out.reshape(num_tokens, self.hidden_size))


class GPTBigCodeBlock(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        hidden_size, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hidden_size, eps)
        self.attn = GPTBigCodeAttention(ctx, f"{prefix}.attn")
        self.ln_2 = LayerNorm(hidden_size, eps)
        self.mlp = PlainMLP(
            ctx, f"{prefix}.mlp", hidden_size, config.n_inner or 4 * hidden_size,
            activation(config.activation_function, "activation_function"), bias=True,
        )

    def forward(
        self, hidden: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.ln_2(hidden))


class GPTBigCodeForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        _check_supported(config)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(
            GPTBigCodeBlock(ctx, f"h.{index}") for index in range(config.num_hidden_layers)
        )
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every layer attends with (prepare its metadata with this one)."""
        return self.h[0].attn.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the cache this model needs."""
        attn = self.h[0].attn
        return len(self.h), attn.num_kv_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch of new tokens."""
        hidden = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            hidden = block(hidden, kv_cache, metadata)
        return self.ln_f(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors, named as in transformers, into the parameters."""
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            # Older checkpoints saved the causal-mask buffers (attn.bias, attn.masked_bias);
            # masks are the attention backend's. (c_attn.bias is a weight: it is loaded.)
            return name.endswith((".attn.bias", ".attn.masked_bias")) or (
                tied and name == "lm_head.weight"
            )

        load_checkpoint(self, weights, _checkpoint_name, skip)


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"transformer.{path}"


def _check_supported(config: PretrainedConfig) -> None:
    if config.add_cross_attention:
        raise ValueError("gpt_bigcode: add_cross_attention=True (an encoder-decoder's decoder) "
                         "is not supported; Pagoda serves decoder-only language models")
