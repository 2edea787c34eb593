"""compressed-tensors' int-quantized (W8A8 int8) and float-quantized (FP8) layers: 8-bit
weights stored unpacked ([out, in] int8 or float8_e4m3fn) with a scale per output channel, per
tensor or per block, and input activations quantized dynamically.

The weights are dequantized at load (nothing on CPU multiplies int8 activations or fp8 faster
than a dense matmul); each call quantizes and dequantizes its input as the tool does, then
multiplies densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.backend.models.layers import Linear, LinearMethod, OutputPart, copy_rows
from pagoda.backend.quantization.activations import DynamicActivations

WEIGHT_DTYPES = {"int": torch.int8, "float": torch.float8_e4m3fn}
WEIGHT_STRATEGIES = ("channel", "tensor", "block")


@dataclass(frozen=True)
class DenseQuantizedMethod(LinearMethod):
    weight_kind: str  # "int" or "float"
    strategy: str  # "channel", "tensor" or "block"
    block: tuple[int, int] | None  # (out, in) features per weight scale, for "block"
    activations: DynamicActivations | None

    def create_weights(self, layer: Linear) -> None:
        layer.params_dtype = torch.get_default_dtype()
        layer.register_buffer("weight", torch.empty(
            layer.output_size, layer.input_size, dtype=WEIGHT_DTYPES[self.weight_kind]))
        layer.register_buffer("weight_scale", torch.empty(self._scale_shape(layer)))
        layer.bias = (nn.Parameter(torch.empty(layer.output_size), requires_grad=False)
                      if layer.has_bias else None)

    def _scale_shape(self, layer: Linear) -> tuple[int, int]:
        if self.strategy == "channel":
            return layer.output_size, 1
        if self.strategy == "tensor":  # one scale per part: fused parts keep their own
            return len(layer.parts), 1
        rows, columns = self.block
        for part in layer.parts:
            if part.offset % rows or part.size % rows:
                raise ValueError(f"compressed-tensors: part {part.name or '(whole)'} of "
                                 f"{part.size} output features does not fall on whole "
                                 f"{rows}-row weight blocks")
        return -(-layer.output_size // rows), -(-layer.input_size // columns)

    def checkpoint_tensors(self, layer: Linear) -> list[str]:
        names = ["weight", "weight_scale"]
        return names + ["bias"] if layer.has_bias else names

    def load(self, layer: Linear, tensor_name: str, tensor: torch.Tensor, part: OutputPart) -> None:
        if tensor_name == "weight_scale":
            tensor = tensor.reshape(-1, 1) if self.strategy != "block" else tensor
            if self.strategy == "tensor":
                part = OutputPart(part.name, layer.parts.index(part), 1)
            elif self.strategy == "block":
                part = OutputPart(part.name, part.offset // self.block[0],
                                  -(-part.size // self.block[0]))
        copy_rows(getattr(layer, tensor_name), tensor, part, tensor_name)

    def after_loading(self, layer: Linear) -> None:
        weight = layer._buffers.pop("weight").float()
        scale = layer._buffers.pop("weight_scale").float()
        if self.strategy == "tensor":
            scale = torch.repeat_interleave(
                scale, torch.tensor([part.size for part in layer.parts], device=scale.device),
                dim=0)
        elif self.strategy == "block":
            rows, columns = self.block
            scale = scale.repeat_interleave(rows, 0)[:weight.shape[0]]
            scale = scale.repeat_interleave(columns, 1)[:, :weight.shape[1]]
        layer.register_buffer("dequantized", (weight * scale).to(layer.params_dtype))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            x = self.activations(x)
        return F.linear(x, layer.dequantized, layer.bias)
