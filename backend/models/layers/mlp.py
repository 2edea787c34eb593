"""Feed-forward blocks: gated (an activated gate times an up projection, as Llama and Gemma) and
plain (one activated projection, as GPT-2, StarCoder2 and GPT-BigCode)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pagoda.backend.models.layers.activation import Activation

if TYPE_CHECKING:  # models/base.py imports this package: no import cycle at run time
    from pagoda.backend.models.base import ModelContext


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)); gate and up are one fused Linear, loaded from
    the checkpoint's gate_proj and up_proj."""

    def __init__(
        self, ctx: ModelContext, prefix: str, hidden_size: int, intermediate_size: int,
        act: Activation, bias: bool = False,
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = ctx.linear(
            f"{prefix}.gate_up_proj", hidden_size,
            {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias,
        )
        self.down_proj = ctx.linear(f"{prefix}.down_proj", intermediate_size, hidden_size, bias)
        self.act = act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))), with GPT-2's module names."""

    def __init__(
        self, ctx: ModelContext, prefix: str, hidden_size: int, intermediate_size: int,
        act: Activation, bias: bool,
    ) -> None:
        super().__init__()
        self.c_fc = ctx.linear(f"{prefix}.c_fc", hidden_size, intermediate_size, bias)
        self.c_proj = ctx.linear(f"{prefix}.c_proj", intermediate_size, hidden_size, bias)
        self.act = act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))
