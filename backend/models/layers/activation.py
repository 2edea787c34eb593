"""Activation functions by their transformers name (`hidden_act`, `activation_function`), with
transformers' formulas, so float32 outputs match its models."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation (GPT-2's tanh approximation), written as it writes it.
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
    return 0.5 * x * (1.0 + torch.tanh(inner))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    # transformers' FastGELUActivation.
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str, field: str = "hidden_act") -> Activation:
    """The activation named `name`; ValueError naming the config `field` when it is unknown."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{field} {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
