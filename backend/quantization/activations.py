"""Dynamic activation quantization as compressed-tensors computes it (W8A8 int8, FP8): a
symmetric scale per token (or per group of features) from the absolute maximum, the values
rounded to the 8-bit type and multiplied back. Emulated in the compute dtype: the CPU has no
faster int8 x int8 or fp8 matmul than dense, and the result is the tool's own arithmetic.

int8: scale = absmax / 127.5 (half of the 255-wide range), q = round(x / scale) in [-128, 127].
fp8 (e4m3): scale = absmax / 448, q = x / scale cast to float8_e4m3fn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True, slots=True)
class DynamicActivations:
    kind: str  # "int" (int8) or "float" (fp8 e4m3)
    group_size: int | None  # None: one scale per token

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.group_size is not None:
            x = x.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        # Zero belongs to the range (as the tool's min/max observer has it).
        absmax = x.abs().amax(dim=-1, keepdim=True)
        if self.kind == "int":
            scale = absmax / ((INT8_MAX - INT8_MIN) / 2)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.round(torch.clamp(x / scale, INT8_MIN, INT8_MAX))
        else:
            scale = absmax / FP8_MAX
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
        return (q * scale).reshape(shape)
