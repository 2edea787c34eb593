"""How a quantized layer multiplies, chosen once its weights are loaded.

On CPU in bfloat16, torch's packed kernels (`_weight_int8pack_mm` for symmetric per-channel
8-bit, `_weight_int4pack_mm_for_cpu` for 4-bit in groups of 32-256) read the small weights
directly: 2-3x a dense matvec at batch 1. Their float32 activations are several times slower
than dense. On CUDA in half precision, 4- and 8-bit weights go through the Triton W4A16/W8A16
GEMM (`pagoda.kernels.triton.int_matmul_triton`). Every other case (float32 compute, as the
exactness tests use; float16 on CPU; layouts the kernels do not take) dequantizes once at load
and runs a dense matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.packing import pack_int32

INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 kernel tiles the output features by 16.
INT4_OUTPUT_MULTIPLE = 16
INT4_INNER_K_TILES = 2


class DenseKernel(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Int8PackKernel(nn.Module):
    """Symmetric per-channel 8-bit: int8 [out, in] and a bfloat16 scale per output feature."""

    def __init__(self, weights: IntWeights) -> None:
        super().__init__()
        self.register_buffer("qweight", (weights.qweight - 128).to(torch.int8))
        self.register_buffer("scales", weights.scales[:, 0].to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int4PackKernel(nn.Module):
    """4-bit in contiguous groups, packed for the CPU tile kernel. Act-order checkpoints (a
    g_idx that scatters groups over the input features) are served by permuting the input
    features so that every group is contiguous: the same permutation is applied to x."""

    def __init__(self, weights: IntWeights, order: torch.Tensor) -> None:
        super().__init__()
        identity = torch.equal(order, torch.arange(order.numel(), device=order.device))
        self.register_buffer("order", None if identity else order)
        qweight = weights.qweight if identity else weights.qweight[:, order]
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(
            qweight.to(torch.int32).contiguous(), INT4_INNER_K_TILES))
        # The kernel computes (q - 8) * scale + offset; (q - zero) * scale is that with
        # offset = (8 - zero) * scale.
        scales = weights.scales.float()
        offsets = (8 - weights.zeros.float()) * scales
        self.register_buffer("scales_and_zeros", torch.stack(
            (scales.t(), offsets.t()), dim=-1).to(torch.bfloat16).contiguous())
        self.group_size = weights.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.order is not None:
            flat = flat[:, self.order]
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


class TritonIntKernel(nn.Module):
    """4- or 8-bit weights packed along the input features (GPTQ's way, so a row of words
    covers contiguous output features), float32 scales and zero points per group, and g_idx
    for every input feature (act order needs no permutation)."""

    def __init__(self, weights: IntWeights) -> None:
        super().__init__()
        self.bits = weights.bits
        self.register_buffer(
            "qweight", pack_int32(weights.qweight.t(), weights.bits, dim=0).contiguous())
        self.register_buffer("scales", weights.scales.t().float().contiguous())
        self.register_buffer("zeros", weights.zeros.t().float().contiguous())
        self.register_buffer("g_idx", weights.groups_of_inputs().to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pagoda.kernels.triton import int_matmul_triton

        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = int_matmul_triton(flat, self.qweight, self.scales, self.zeros, self.g_idx,
                                self.bits)
        return out.reshape(*x.shape[:-1], -1)


def int_kernel(weights: IntWeights, dtype: torch.dtype) -> nn.Module:
    """The fastest kernel for these weights with `dtype` activations on their device."""
    device = weights.qweight.device.type
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16) and weights.bits in (4, 8):
        return TritonIntKernel(weights)
    if device == "cpu" and dtype == torch.bfloat16:
        symmetric = bool((weights.zeros == 1 << (weights.bits - 1)).all())
        if weights.bits == 8 and weights.scales.shape[1] == 1 and symmetric:
            return Int8PackKernel(weights)
        if weights.bits == 4 and _int4_fits(weights):
            order = weights.contiguous_order()
            if order is not None:
                return Int4PackKernel(weights, order)
    return DenseKernel(weights.dequantize(dtype))


def _int4_fits(weights: IntWeights) -> bool:
    out_features = weights.qweight.shape[0]
    return (weights.group_size in INT4_GROUP_SIZES
            and out_features % INT4_OUTPUT_MULTIPLE == 0)
