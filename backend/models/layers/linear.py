"""Linear layers whose storage is chosen by a LinearMethod, so model files never branch on how a
weight is kept (dense, quantized, sharded across ranks).

A Linear may fuse several checkpoint tensors along its output dimension (q, k and v into one
qkv projection; gate and up into one): each is an OutputPart, a band of output features with the
checkpoint module name it is loaded from. One matmul then serves all parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, slots=True)
class OutputPart:
    """Output features offset..offset+size of a Linear, stored in the checkpoint as module `name`
    (a sibling of the Linear, e.g. "k_proj" for a fused "qkv_proj"; "" is the Linear itself)."""

    name: str
    offset: int
    size: int


class LinearMethod(ABC):
    """How a Linear creates, loads and applies its weights; one implementation per scheme."""

    @abstractmethod
    def create_weights(self, layer: Linear) -> None:
        """Register the layer's parameters, on the default device and dtype."""

    @abstractmethod
    def checkpoint_tensors(self, layer: Linear) -> list[str]:
        """The tensor names (e.g. "weight", "bias"; "qweight", "scales" for GPTQ) the checkpoint
        holds for each part of the layer."""

    def optional_tensors(self, layer: Linear) -> list[str]:
        """Those of `checkpoint_tensors` that some writers of the format leave out (GPTQ's
        g_idx when not quantized in activation order): their absence is no error."""
        return []

    @abstractmethod
    def load(self, layer: Linear, tensor_name: str, tensor: torch.Tensor, part: OutputPart) -> None:
        """Put one checkpoint tensor of one part into the layer's parameters; ValueError (naming
        the tensor) when its shape does not fit."""

    def after_loading(self, layer: Linear) -> None:
        """Called once every tensor is loaded: repack for a kernel, drop staging copies."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [..., input_size] -> [..., output_size]."""


class Linear(nn.Module):
    """y = x W^T (+ b), W stored and applied by `method`."""

    def __init__(
        self,
        input_size: int,
        output_sizes: int | dict[str, int],
        bias: bool,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        sizes = {"": output_sizes} if isinstance(output_sizes, int) else output_sizes
        self.parts: list[OutputPart] = []
        offset = 0
        for name, size in sizes.items():
            self.parts.append(OutputPart(name, offset, size))
            offset += size
        self.input_size = input_size
        self.output_size = offset
        self.has_bias = bias
        self.method = method or UNQUANTIZED
        self.method.create_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        parts = ", ".join(part.name for part in self.parts if part.name)
        return (f"in={self.input_size}, out={self.output_size}, bias={self.has_bias}, "
                f"method={type(self.method).__name__}" + (f", parts=({parts})" if parts else ""))


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [output_size, input_size] in the model's dtype."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size),
                                    requires_grad=False)
        layer.bias = (nn.Parameter(torch.empty(layer.output_size), requires_grad=False)
                      if layer.has_bias else None)

    def checkpoint_tensors(self, layer: Linear) -> list[str]:
        return ["weight", "bias"] if layer.has_bias else ["weight"]

    def load(self, layer: Linear, tensor_name: str, tensor: torch.Tensor, part: OutputPart) -> None:
        copy_rows(getattr(layer, tensor_name), tensor, part, tensor_name)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


UNQUANTIZED = UnquantizedLinearMethod()


def copy_rows(
    param: torch.Tensor, tensor: torch.Tensor, part: OutputPart, tensor_name: str, dim: int = 0
) -> None:
    """Copy `tensor` into the band of `param` that `part` owns along `dim` (the output features'
    dimension of that parameter), checking the shape first."""
    expected = list(param.shape)
    expected[dim] = part.size
    if list(tensor.shape) != expected:
        raise ValueError(f"tensor {tensor_name} of part {part.name or '(whole)'} has shape "
                         f"{tuple(tensor.shape)}, expected {tuple(expected)}")
    with torch.no_grad():
        param.narrow(dim, part.offset, part.size).copy_(tensor)
