"""What the Triton kernels share at launch: the interpreter check, dot operand types, layouts.

Triton decides once per process, when it is imported, whether kernels are compiled or run by its
interpreter (`TRITON_INTERPRET=1`): its own library functions (`tl.max`, `tl.sum`...) are
decorated then. Compiled kernels take CUDA tensors; interpreted ones take CPU tensors (and copy
CUDA tensors through the host, which only a test would want).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The window the kernels get without a sliding window: wider than any context, so every earlier
# key is visible. A constant rather than the batch's longest sequence, which changes every step
# and would make Triton specialize (and compile) kernels anew for its value.
NO_SLIDING_WINDOW = 1 << 30

_TL_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def interpreting() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return bool(triton.knobs.runtime.interpret)


def window_size(sliding_window: int | None) -> int:
    """The window argument of the attention kernels: the model's, or NO_SLIDING_WINDOW."""
    return NO_SLIDING_WINDOW if sliding_window is None else sliding_window


def soft_cap_value(soft_cap: float | None) -> float:
    """The soft-cap argument of the attention kernels. Without a cap the kernels are compiled
    with SOFT_CAP off and never read it; 1.0 stands in. A cap must be positive."""
    if soft_cap is None:
        return 1.0
    if soft_cap <= 0:
        raise ValueError(f"soft_cap must be positive, got {soft_cap}")
    return float(soft_cap)


def dot_dtype(cache: torch.Tensor) -> tl.dtype:
    """The operand type of `tl.dot` over values read from `cache`: the cache's own, so that
    half-precision caches use tensor cores; float32 for bfloat16 under the interpreter, whose
    bfloat16 matrix products are wrong."""
    if cache.dtype not in _TL_DTYPES:
        raise TypeError(f"Triton kernels support {sorted(map(str, _TL_DTYPES))}, got {cache.dtype}")
    if cache.dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[cache.dtype]


def require_unit_stride(**tensors: torch.Tensor) -> None:
    """Kernels index the last dimension (head_dim) with unit stride."""
    for name, tensor in tensors.items():
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def require_same_layout(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """Kernels address K and V with one set of strides."""
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides")
