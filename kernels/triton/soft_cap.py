"""Attention logit soft-capping (Gemma 2) inside the attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def soft_cap_scores(scores, soft_cap):
    """soft_cap * tanh(scores / soft_cap), elementwise, in float32.

    tanh is built from exp: libdevice's tanh does not run under the interpreter. Written with
    exp(-2|x|), which lies in (0, 1], so no score overflows whatever its size."""
    x = scores / soft_cap
    decay = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - decay) / (1.0 + decay)
    return soft_cap * tl.where(x < 0, -magnitude, magnitude)
