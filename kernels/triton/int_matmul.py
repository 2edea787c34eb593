"""W4A16 / W8A16 matrix product (Triton): integer weights dequantized tile by tile in
registers, group-wise scales and zero points, act-order through g_idx. The layout is
`pagoda.kernels.int_matmul`'s."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.triton.launch import dot_dtype

# Decode-sized rows (one token per sequence) pad up to the 16 rows tl.dot needs.
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _int_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr,
    M, N, K, stride_xm, stride_qk, stride_sg, stride_om,
    BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    column_mask = columns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        tile_mask = k_mask[:, None] & column_mask[None, :]
        words = tl.load(qweight_ptr + (ks // PACK)[:, None].to(tl.int64) * stride_qk
                        + columns[None, :], mask=tile_mask, other=0)
        # An arithmetic shift drags the sign bit along; the mask keeps the value's own bits.
        q = (words >> ((ks % PACK) * BITS)[:, None]) & ((1 << BITS) - 1)
        groups = tl.load(g_idx_ptr + ks, mask=k_mask, other=0).to(tl.int64)
        scale = tl.load(scales_ptr + groups[:, None] * stride_sg + columns[None, :],
                        mask=tile_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + groups[:, None] * stride_sg + columns[None, :],
                       mask=tile_mask, other=0.0).to(tl.float32)
        weight = (q.to(tl.float32) - zero) * scale
        if IEEE:
            acc = tl.dot(x, weight, acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(DOT_DTYPE), weight.to(DOT_DTYPE), acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + columns[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])


def int_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype (see `int_matmul_reference`)."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit weights do not pack into int32 words")
    if x.stride(-1) != 1 or qweight.stride(-1) != 1 or scales.stride() != zeros.stride():
        raise ValueError("x, qweight, scales and zeros must be contiguous in their last "
                         "dimension, scales and zeros laid out alike")
    rows, in_features = x.shape
    out_features = qweight.shape[1]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(out_features, BLOCK_N))
    operand = dot_dtype(x)
    _int_matmul_kernel[grid](
        x, qweight, scales, zeros, g_idx, out,
        rows, out_features, in_features, x.stride(0), qweight.stride(0), scales.stride(0),
        out.stride(0),
        BITS=bits, DOT_DTYPE=operand, IEEE=x.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return out
