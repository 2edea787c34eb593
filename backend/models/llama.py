"""The Llama family (Llama 1-3, Vicuna, Mistral, Qwen2) reading and writing the paged KV cache.

One implementation covers the three architectures; they differ only in configuration: Qwen2 adds
biases to q/k/v, Mistral may set a sliding window, Llama 3 scales its rotary frequencies. Families
that differ only in their layers (Qwen3, the mixtures of experts) override `make_layer`.
Numerics follow transformers' implementation (RMSNorm in float32, rotate-half rotary embedding),
so float32 outputs match it token for token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import (
    Linear,
    RMSNorm,
    RotaryAngles,
    RotaryEmbedding,
    apply_rotary,
    load_checkpoint,
)


class Attention(nn.Module):
    def __init__(
        self, ctx: ModelContext, prefix: str, qkv_bias: bool | None = None, *,
        sliding_window: int | None,
    ) -> None:
        """`qkv_bias` None: q/k/v have biases in Qwen2 or with attention_bias set.
        `sliding_window`: how many positions this layer attends to (None: all of them)."""
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # transformers' Llama biases all four projections when attention_bias is set; Qwen2
        # (and the families passing qkv_bias) bias q/k/v only.
        attention_bias = getattr(config, "attention_bias", False)
        bias = qkv_bias
        if bias is None:
            bias = config.model_type == "qwen2" or attention_bias
        output_bias = qkv_bias is None and config.model_type != "qwen2" and attention_bias
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": self.q_size, "k_proj": self.kv_size, "v_proj": self.kv_size}, bias,
        )
        self.o_proj = ctx.linear(f"{prefix}.o_proj", self.q_size, config.hidden_size, output_bias)
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
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(
            query, key, value, *kv_cache, metadata, self.scale, sliding_window=self.sliding_window
        )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(
        self, ctx: ModelContext, prefix: str, intermediate_size: int | None = None
    ) -> None:
        """`intermediate_size` None: the config's."""
        super().__init__()
        config = ctx.config
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        self.intermediate_size = (config.intermediate_size if intermediate_size is None
                                  else intermediate_size)
        self.gate_up_proj = ctx.linear(
            f"{prefix}.gate_up_proj", config.hidden_size,
            {"gate_proj": self.intermediate_size, "up_proj": self.intermediate_size}, False,
        )
        self.down_proj = ctx.linear(
            f"{prefix}.down_proj", self.intermediate_size, config.hidden_size, False
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks, each added to the residual stream. Families
    that keep this shape pass their own `attention` or `mlp` (a mixture of experts)."""

    def __init__(
        self,
        ctx: ModelContext,
        prefix: str,
        attention: nn.Module | None = None,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        config = ctx.config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if attention is None:
            window = _sliding_window(config)
            attention = Attention(ctx, f"{prefix}.self_attn", sliding_window=window)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(ctx, f"{prefix}.mlp") if mlp is None else mlp

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.make_layer(ctx, index) for index in range(config.num_hidden_layers)
        )
        attn = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(config, attn.head_dim, ctx.max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def make_layer(self, ctx: ModelContext, index: int) -> nn.Module:
        """Decoder layer `index` (module path "layers.{index}"); families that differ from Llama
        only in their layers override this."""
        return DecoderLayer(ctx, f"layers.{index}")

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
        """Copy checkpoint tensors, named as in transformers, into the parameters; q/k/v and
        gate/up are stored fused here, each checkpoint tensor filling its band of rows."""
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            # Some tied checkpoints store the shared matrix twice; rotary tables are computed.
            return "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")

        load_checkpoint(self, weights, _checkpoint_name, skip)


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"model.{path}"


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The one window of Mistral (and Mixtral), and of Qwen2 with use_sliding_window; every
    layer attends within it."""
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)
