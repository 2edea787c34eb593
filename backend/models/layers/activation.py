"""Activation functions by the names transformers' configs give them (`hidden_act`,
`hidden_activation`, `activation_function`), computed as transformers computes each."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation written out: rounds differently from F.gelu(approximate="tanh").
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str, field: str) -> Activation:
    """The activation a config names in `field`; ValueError naming the field if unknown."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field} {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
