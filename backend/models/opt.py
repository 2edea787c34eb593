"""OPT (facebook/opt-125m ... 66b, and fine-tunes keeping OPTForCausalLM) on the paged KV cache.

No rotary embedding: learned absolute positions, looked up at position + 2 (OPT's embedding
table has two extra leading rows). LayerNorms with bias (or no affine weights at all), a ReLU
MLP, biases everywhere (`enable_bias`), and either pre-norm layers (`do_layer_norm_before`, all
sizes but 350m) or post-norm ones (350m). opt-350m also embeds words in a smaller dimension
(`word_embed_proj_dim`), projected in before the first layer and out after the last.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.base import KVCache, ModelContext
from pagoda.backend.models.layers import LayerNorm, Linear, activation, load_checkpoint

# OPT's learned positions start at row 2 of embed_positions (a fairseq padding offset).
POSITION_OFFSET = 2
# torch's LayerNorm default, which OPT's layers use (its config has no eps).
LAYER_NORM_EPS = 1e-5


def _layer_norm(config) -> LayerNorm:
    return LayerNorm(config.hidden_size, LAYER_NORM_EPS,
                     elementwise_affine=config.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.qkv_proj = ctx.linear(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q_proj": config.hidden_size, "k_proj": config.hidden_size,
             "v_proj": config.hidden_size},
            config.enable_bias,
        )
        self.out_proj = ctx.linear(f"{prefix}.out_proj", config.hidden_size, config.hidden_size,
                                   config.enable_bias)
        self.backend = ctx.attention
        self.scale = self.head_dim**-0.5

    def forward(
        self, hidden: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split(self.hidden_size, dim=-1)
        # OPT scales the query before the product (transformers then attends with scale 1):
        # the same rounding as theirs.
        query = (query * self.scale).view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_heads, self.head_dim)
        value = value.view(num_tokens, self.num_heads, self.head_dim)
        out = self.backend.forward(query, key, value, *kv_cache, metadata, 1.0)
        return self.out_proj(out.reshape(num_tokens, self.hidden_size))


class OPTDecoderLayer(nn.Module):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__()
        config = ctx.config
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(ctx, f"{prefix}.self_attn")
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = ctx.linear(f"{prefix}.fc1", config.hidden_size, config.ffn_dim,
                              config.enable_bias)
        self.fc2 = ctx.linear(f"{prefix}.fc2", config.ffn_dim, config.hidden_size,
                              config.enable_bias)
        self.act = activation(config.activation_function, "activation_function")
        self.final_layer_norm = _layer_norm(config)

    def forward(
        self, hidden: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata
    ) -> torch.Tensor:
        pre_norm = self.do_layer_norm_before
        attn_in = self.self_attn_layer_norm(hidden) if pre_norm else hidden
        hidden = hidden + self.self_attn(attn_in, kv_cache, metadata)
        if not pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        mlp_in = self.final_layer_norm(hidden) if pre_norm else hidden
        hidden = hidden + self.fc2(self.act(self.fc1(mlp_in)))
        return hidden if pre_norm else self.final_layer_norm(hidden)


class OPTForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = ctx.config
        self.config = config
        word_dim = config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, word_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET,
                                            config.hidden_size)
        projected = word_dim != config.hidden_size
        self.project_in = (ctx.linear("project_in", word_dim, config.hidden_size, False)
                           if projected else None)
        self.project_out = (ctx.linear("project_out", config.hidden_size, word_dim, False)
                            if projected else None)
        self.layers = nn.ModuleList(
            OPTDecoderLayer(ctx, f"layers.{index}") for index in range(config.num_hidden_layers)
        )
        # Post-norm layers (350m) end normalized already; `_remove_final_layer_norm` is a
        # transformers compatibility flag for some old checkpoints.
        keep_final = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = _layer_norm(config) if keep_final else None
        # NOTE: the LM head stays dense whatever the scheme, as the quantization tools leave it.
        self.lm_head = Linear(word_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def attention_backend(self) -> AttentionBackend:
        return self.layers[0].self_attn.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden = self.project_in(hidden)
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, kv_cache, metadata)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.config.tie_word_embeddings

        def skip(name: str) -> bool:
            return tied and name == "lm_head.weight"

        load_checkpoint(self, _with_model_prefix(weights), _checkpoint_name, skip)


def _with_model_prefix(
    weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterable[tuple[str, torch.Tensor]]:
    # facebook/opt-* checkpoints name their tensors "decoder.…" (the base model's names);
    # transformers' own saves say "model.decoder.…".
    for name, tensor in weights:
        yield (f"model.{name}" if name.startswith("decoder.") else name), tensor


def _checkpoint_name(path: str) -> str:
    return path if path.startswith("lm_head.") else f"model.decoder.{path}"
