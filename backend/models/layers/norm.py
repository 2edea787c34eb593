"""Normalization layers with transformers' numerics (statistics in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back before the weight is applied, as
    Llama-style models in transformers do (so float32 and half outputs match theirs)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


class LayerNorm(nn.Module):
    """torch's LayerNorm (what transformers' GPT-NeoX, StableLM, OPT, StarCoder2 and GPT-BigCode
    use), with the bias and the affine weights each optional: StableLM's per-head norms have no
    bias, and OPT's `layer_norm_elementwise_affine=False` checkpoints store neither."""

    def __init__(
        self, hidden_size: int, eps: float, bias: bool = True, elementwise_affine: bool = True
    ) -> None:
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.bias = (nn.Parameter(torch.zeros(hidden_size))
                     if elementwise_affine and bias else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(hidden, self.normalized_shape, self.weight, self.bias, self.eps)


class PerHeadLayerNorm(nn.Module):
    """A LayerNorm (no bias) of its own for every head, over that head's features: StableLM's
    `qk_layernorm`. Checkpoints store one weight per head (`norms.{head}.weight`); all heads are
    normalized in one call and scaled by the stacked weights."""

    def __init__(self, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(
            LayerNorm(head_dim, eps, bias=False) for _ in range(num_heads)
        )
        self.head_dim = head_dim
        self.eps = eps

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        """heads [num_tokens, num_heads, head_dim]."""
        weight = torch.stack([norm.weight for norm in self.norms])
        return F.layer_norm(heads, (self.head_dim,), None, None, self.eps) * weight


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 (scale = 1 + weight), and the
    product is taken in float32 before the cast back (Llama's casts first), as transformers'
    Gemma 2 and 3 do."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = hidden.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(hidden.dtype)
