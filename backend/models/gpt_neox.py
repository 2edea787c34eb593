"""GPT-NeoX (Pythia, Dolly v2, OpenAssistant's Pythia SFT models, StableLM-alpha, GPT-NeoX-20B)
on the paged KV cache.

LayerNorms with bias, a plain GELU MLP, partial rotary (`rotary_pct`, 0.25 for Pythia) and,
for most checkpoints, the parallel residual: attention and MLP both read the layer's input and
their outputs are added to it together. The checkpoint's `query_key_value` interleaves q, k and
v per head ([head, (q k v), head_dim] along its outputs); the fused projection keeps that layout
and the heads are split after it, so the tensor loads as it is.
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
    RotaryAngles,
    RotaryEmbedding,
    activation,
    apply_rotary,
    load_checkpoint,
)


class GPTNeoXAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", True)
        self.query_key_value = ctx.linear(f"{prefix}.query_key_value", config.hidden_size,
                                          3 * config.hidden_size, bias)
        self.dense = ctx.linear(f"{prefix}.dense", config.hidden_size, config.hidden_size, bias)
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
        qkv = self.query_key_value(hidden).view(num_tokens, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.chunk(3, dim=-1)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(query, key, value.contiguous(), *kv_cache, metadata, self.scale)
        return self.dense(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GPTNeoXMLP(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.dense_h_to_4h = ctx.linear(f"{prefix}.dense_h_to_4h", config.hidden_size,
                                        config.intermediate_size, True)
        self.dense_4h_to_h = ctx.linear(f"{prefix}.dense_4h_to_h", config.intermediate_size,
                                        config.hidden_size, True)
        self.act = activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(ctx, f"{prefix}.attention")
        self.mlp = GPTNeoXMLP(ctx, f"{prefix}.mlp")

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attn = self.attention(angles, self.input_layernorm(hidden), kv_cache, metadata)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)), summed in transformers' order.
            return self.mlp(self.post_attention_layernorm(hidden)) + attn + hidden
        hidden = attn + hidden
        return self.mlp(self.post_attention_layernorm(hidden)) + hidden


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GPTNeoXLayer(ctx, f"layers.{index}") for index in range(config.num_hidden_layers)
        )
        head_dim = self.layers[0].attention.head_dim
        rotary_dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        self.rotary = RotaryEmbedding(config, rotary_dim, ctx.max_positions)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.embed_out = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.embed_in.weight

    @property
    def attention_backend(self) -> AttentionBackend:
        return self.layers[0].attention.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        attn = self.layers[0].attention
        return len(self.layers), attn.num_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        angles = self.rotary(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(angles, hidden, kv_cache, metadata)
        return self.final_layer_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            # Older checkpoints (Pythia, Dolly) also store each layer's rotary table and causal
            # mask buffers (attention.rotary_emb.inv_freq, attention.bias, .masked_bias).
            return (name.endswith((".rotary_emb.inv_freq", ".attention.bias",
                                   ".attention.masked_bias"))
                    or (tied and name == "embed_out.weight"))

        load_checkpoint(self, weights, _checkpoint_name, skip)


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("embed_out.") else f"gpt_neox.{path}"
