"""Qwen3 (dense): the Llama architecture with an RMSNorm over each head of q and of k, applied
before the rotary embedding, as transformers' Qwen3Attention does."""

from __future__ import annotations

import torch

from pagoda.backend.models.base import ModelContext
from pagoda.backend.models.layers import RMSNorm
from pagoda.backend.models.llama import Attention, LlamaForCausalLM


class Qwen3Attention(Attention):
    def __init__(self, ctx: ModelContext, prefix: str) -> None:
        super().__init__(ctx, prefix)
        eps = ctx.config.rms_norm_eps
        # One weight of head_dim shared by all heads (unlike OLMo's norm over the whole q).
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def project_heads(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value = super().project_heads(hidden)
        return self.q_norm(query), self.k_norm(key), value


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention

    def __init__(self, ctx: ModelContext) -> None:
        layer_types = getattr(ctx.config, "layer_types", None) or []
        windowed = [index for index, kind in enumerate(layer_types) if kind != "full_attention"]
        if windowed:
            # Released Qwen3 checkpoints attend fully everywhere; use_sliding_window=True gives
            # the layers from max_window_layers on a window of their own, which one model-wide
            # window cannot express.
            raise ValueError(
                f"Qwen3ForCausalLM: layer_types makes layers {windowed} sliding-window layers "
                "(use_sliding_window=True); per-layer sliding windows are not supported"
            )
        super().__init__(ctx)
        # NOTE: Qwen3 configs may name a sliding_window that no layer uses.
        self.sliding_window = None
