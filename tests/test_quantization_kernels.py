"""The kernels a quantized layer may run on give the product with its dequantized weight:
torch's int4 pack kernel (contiguous groups, and act-order groups through a permutation of the
input features), its int8 pack kernel, the dense fallback, and the Triton W4A16/W8A16 GEMM
(under Triton's interpreter on CPU, compiled on CUDA with the gpu marker)."""

from __future__ import annotations

import pytest
import torch
import triton_devices

from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.kernels import (
    DenseKernel,
    Int4PackKernel,
    Int8PackKernel,
    TritonIntKernel,
    int_kernel,
)

# The Triton kernel accumulates in float32 and rounds once to the output type; half-precision
# operands of its products add a little on CUDA.
KERNEL_TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 5e-2, "rtol": 2e-2},
}


def random_weights(bits: int, out_features: int, in_features: int, group_size: int,
                   act_order: bool, symmetric: bool) -> IntWeights:
    generator = torch.Generator().manual_seed(bits * 1000 + group_size + act_order)
    groups = in_features // group_size
    qweight = torch.randint(0, 2**bits, (out_features, in_features), generator=generator,
                            dtype=torch.int32)
    zeros = torch.full((out_features, groups), 2 ** (bits - 1), dtype=torch.int32) if symmetric \
        else torch.randint(0, 2**bits, (out_features, groups), generator=generator,
                           dtype=torch.int32)
    scales = torch.rand(out_features, groups, generator=generator) * 0.02 + 0.001
    g_idx = None
    if act_order:  # each group's features scattered over the input, as GPTQ's desc_act makes
        g_idx = (torch.randperm(in_features, generator=generator) // group_size).to(torch.int32)
    return IntWeights(bits, qweight, zeros, scales, g_idx)


def bf16_product(weights: IntWeights, x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float() @ weights.dequantize(torch.float32).t()


@pytest.mark.parametrize("group_size, act_order, symmetric", [
    (32, False, True), (64, False, False), (32, True, True), (128, True, False)])
def test_int4_pack_kernel_multiplies_by_the_dequantized_weight(group_size, act_order, symmetric):
    weights = random_weights(4, 48, 256, group_size, act_order, symmetric)
    kernel = int_kernel(weights, torch.bfloat16)
    assert isinstance(kernel, Int4PackKernel)
    assert (kernel.order is not None) == act_order
    x = torch.randn(3, 256)
    out = kernel(x)
    assert out.dtype == torch.float32
    # bfloat16 activations and scales: ~3 significant digits.
    torch.testing.assert_close(out, bf16_product(weights, x), rtol=2e-2, atol=2e-2)


def test_int8_pack_kernel_takes_symmetric_per_channel_weights_only():
    weights = random_weights(8, 32, 64, 64, False, True)
    kernel = int_kernel(weights, torch.bfloat16)
    assert isinstance(kernel, Int8PackKernel)
    x = torch.randn(2, 5, 64)
    expected = bf16_product(weights, x.reshape(10, 64)).reshape(2, 5, 32)
    torch.testing.assert_close(kernel(x), expected, rtol=2e-2, atol=2e-2)
    asymmetric = random_weights(8, 32, 64, 64, False, False)
    grouped = random_weights(8, 32, 64, 32, False, True)
    assert isinstance(int_kernel(asymmetric, torch.bfloat16), DenseKernel)
    assert isinstance(int_kernel(grouped, torch.bfloat16), DenseKernel)


def test_float32_and_unsupported_layouts_dequantize_at_load():
    weights = random_weights(4, 48, 256, 32, True, False)
    kernel = int_kernel(weights, torch.float32)
    assert isinstance(kernel, DenseKernel)
    x = torch.randn(4, 256)
    torch.testing.assert_close(kernel(x), x @ weights.dequantize(torch.float32).t())
    # The int4 kernel tiles output features by 16 and takes groups of 32 to 256.
    assert isinstance(int_kernel(random_weights(4, 40, 256, 32, False, True), torch.bfloat16),
                      DenseKernel)
    assert isinstance(int_kernel(random_weights(4, 48, 256, 16, False, True), torch.bfloat16),
                      DenseKernel)


@pytest.mark.parametrize("device", triton_devices.DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits, group_size, act_order, symmetric", [
    (4, 32, False, True), (4, 64, True, False), (8, 128, False, False), (8, 32, True, True)])
def test_triton_int_matmul_equals_its_reference(device, dtype, bits, group_size, act_order,
                                                symmetric):
    from pagoda.kernels import int_matmul_reference

    device = triton_devices.require(device)
    weights = random_weights(bits, 80, 256, group_size, act_order, symmetric)
    kernel = TritonIntKernel(weights).to(device)
    x = torch.randn(5, 256, device=device).to(dtype)
    out = kernel(x)
    expected = int_matmul_reference(x, kernel.qweight, kernel.scales, kernel.zeros, kernel.g_idx,
                                    bits)
    torch.testing.assert_close(out, expected, **KERNEL_TOLERANCES[dtype])
    # The reference is the dequantized weight's product: the repacked layout loses nothing.
    dense = weights.dequantize(torch.float32).t().to(device)
    torch.testing.assert_close(expected.float(), (x.float() @ dense).to(dtype).float(),
                               **KERNEL_TOLERANCES[dtype])
