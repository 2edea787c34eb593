"""x @ W for integer weights, in the layout the Triton kernel reads (`int_matmul_triton`).

qweight int32 [K * bits/32, N]: unsigned `bits`-bit values packed along the input features K
(value j of a word at bits j*bits..), as GPTQ stores them, so that a row of words covers N
contiguous output features. scales and zeros [G, N] per group of input features, g_idx int32
[K] the group of each input feature (act-order checkpoints scatter groups over K):
W[k, n] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n].
"""

from __future__ import annotations

import torch


def unpack_along_inputs(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K * bits/32, N] -> unsigned values int32 [K, N]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    values = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(-1, qweight.shape[1])


def int_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype, computed in float32."""
    groups = g_idx.long()
    weight = (unpack_along_inputs(qweight, bits).float() - zeros[groups].float()) \
        * scales[groups].float()
    return (x.float() @ weight).to(x.dtype)
