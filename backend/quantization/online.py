"""Quantizing an unquantized checkpoint's linear layers at load (`quantization="int8"` or
"fp8"), weight-only, round to nearest with one scale per output channel, as vLLM's online
schemes do.

int8: q = round(w / s), s = absmax / 127, then the kernel integer weights take (torch's int8
kernel on CPU in bfloat16). fp8: w / s in float8_e4m3fn, s = absmax / 448; nothing on CPU
multiplies fp8 faster than dense, so the rounded weights are stored dequantized.
"""

from __future__ import annotations

import torch

from pagoda.backend.models.layers import Linear, LinearMethod, UnquantizedLinearMethod
from pagoda.backend.quantization.base import QuantizationConfig
from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.kernels import DenseKernel, int_kernel

INT8_MAX = 127
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def quantize_int8(weight: torch.Tensor) -> IntWeights:
    """Symmetric per-channel int8 of a dense [out, in] weight (unsigned form: q + 128)."""
    scales = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / INT8_MAX
    q = torch.round(weight.float() / scales).clamp(-INT8_MAX, INT8_MAX).to(torch.int32)
    zeros = torch.full_like(scales, 128, dtype=torch.int32)
    return IntWeights(8, q + 128, zeros, scales)


def round_to_fp8(weight: torch.Tensor) -> torch.Tensor:
    """The weight as per-channel scaled float8_e4m3fn represents it, in float32."""
    scales = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (weight.float() / scales).to(torch.float8_e4m3fn).float() * scales


class OnlineInt8Method(UnquantizedLinearMethod):
    """Loads dense weights as the unquantized method does, then quantizes them."""

    def after_loading(self, layer: Linear) -> None:
        weight = layer._parameters.pop("weight")
        layer.kernel = int_kernel(quantize_int8(weight.detach()), weight.dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = layer.kernel(x)
        return out + layer.bias if layer.bias is not None else out


class OnlineFp8Method(OnlineInt8Method):
    def after_loading(self, layer: Linear) -> None:
        weight = layer._parameters.pop("weight")
        layer.kernel = DenseKernel(round_to_fp8(weight.detach()).to(weight.dtype))


class OnlineConfig(QuantizationConfig):
    from_checkpoint = False

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.method: LinearMethod = OnlineInt8Method() if scheme == "int8" else OnlineFp8Method()

    def linear_method(self, module: str) -> LinearMethod:
        return self.method
