"""The Gemma 2 and Gemma 3 (text) families reading and writing the paged KV cache.

Both alternate sliding-window and global attention layers (`config.layer_types`), normalize on
both sides of attention and of the feed-forward ("sandwich" norms) with Gemma's RMSNorm
(1 + weight), scale attention scores by `query_pre_attn_scalar`^-0.5 instead of head_dim^-0.5,
scale embeddings by sqrt(hidden_size) rounded to the model's dtype, use a GELU-tanh gated MLP, and
may soft-cap the final logits. They differ in configuration only:

- Gemma 2 soft-caps attention scores (`attn_logit_softcapping`) and has one set of rotary
  parameters;
- Gemma 3 normalizes each head's query and key (q_norm, k_norm) and has rotary parameters per
  layer type (its local layers use `rope_local_base_freq` as theta). transformers' Gemma 3 never
  passes `attn_logit_softcapping` to its attention, so neither does this one.

Numerics follow transformers' implementation, so float32 outputs match it token for token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import (
    GatedMLP,
    GemmaRMSNorm,
    Linear,
    RotaryAngles,
    RotaryEmbedding,
    activation,
    apply_rotary,
    load_checkpoint,
)

SLIDING, GLOBAL = "sliding_attention", "full_attention"


class GemmaAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, layer_type: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size}, bias,
        )
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size, bias)
        self.backend = ctx.attention
        self.scale = config.query_pre_attn_scalar**-0.5
        self.sliding_window = config.sliding_window if layer_type == SLIDING else None
        self.soft_cap = config.attn_logit_softcapping if config.model_type == "gemma2" else None
        self.qk_norm = config.model_type == "gemma3_text"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)

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
        if self.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(
            query, key, value, *kv_cache, metadata, self.scale,
            sliding_window=self.sliding_window, soft_cap=self.soft_cap,
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str, layer_type: str) -> None:
        super().__init__()
        config = ctx.config
        hidden_size, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.input_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.self_attn = GemmaAttention(ctx, f"{prefix}.self_attn", layer_type)
        self.post_attention_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.mlp = GatedMLP(
            ctx, f"{prefix}.mlp", hidden_size, config.intermediate_size,
            activation(config.hidden_activation, "hidden_activation"),
        )
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        attended = self.self_attn(angles, self.input_layernorm(hidden), kv_cache, metadata)
        hidden = hidden + self.post_attention_layernorm(attended)
        fed = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(fed)


class GemmaForCausalLM(nn.Module):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (Gemma 3 1B, and the text of a Gemma 3 checkpoint
    saved as text-only)."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        _check_supported(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(ctx, f"layers.{index}", layer_type)
            for index, layer_type in enumerate(config.layer_types)
        )
        self.rotary = _rotary_by_layer_type(config, ctx.max_positions)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.final_soft_cap = config.final_logit_softcapping

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
        hidden = hidden * _rounded(self.embed_scale, hidden.dtype)
        angles = {kind: rotary(positions, hidden.dtype) for kind, rotary in self.rotary.items()}
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(angles[layer.layer_type], hidden, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_soft_cap is not None:
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors, named as in transformers, into the parameters; q/k/v and
        gate/up are stored fused here, each checkpoint tensor filling its band of rows."""
        tied = self.config.tie_word_embeddings
        load_checkpoint(
            self, weights, _checkpoint_name, skip=lambda name: tied and name == "lm_head.weight"
        )


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"model.{path}"


@functools.cache
def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` as the nearest number of `dtype`: transformers multiplies the embeddings by
    sqrt(hidden_size) cast to the weights' dtype (55.4256 becomes 55.5 in bfloat16)."""
    return torch.tensor(value, dtype=dtype).item()


def _rotary_by_layer_type(config: PretrainedConfig, max_positions: int) -> nn.ModuleDict:
    """The rotary tables of each layer type: Gemma 3's rope_parameters has a set per type;
    Gemma 2's one set serves both (one table, shared)."""
    layer_types = sorted(set(config.layer_types))
    parameters = config.rope_parameters or {}
    if all(kind in parameters for kind in layer_types):
        return nn.ModuleDict({
            kind: RotaryEmbedding(config, config.head_dim, max_positions, kind)
            for kind in layer_types
        })
    shared = RotaryEmbedding(config, config.head_dim, max_positions)
    return nn.ModuleDict({kind: shared for kind in layer_types})


def _check_supported(config: PretrainedConfig) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{config.model_type}: use_bidirectional_attention=True (an embedding model's "
            "encoder) is not supported; Pagoda serves causal language models"
        )
    unknown = sorted(set(config.layer_types) - {SLIDING, GLOBAL})
    if unknown:
        raise ValueError(f"{config.model_type}: layer_types {unknown} are not supported; "
                         f"supported: {[SLIDING, GLOBAL]}")
    if len(config.layer_types) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: layer_types has {len(config.layer_types)} "
                         f"entries for num_hidden_layers={config.num_hidden_layers}")
