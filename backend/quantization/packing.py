"""Unpacking the integer layouts the tools write: several small unsigned integers per int32.

GPTQ, compressed-tensors and AutoRound put value j of each 32-bit word at bits j*b..j*b+b-1
(little end first). AWQ's GEMM layout shuffles the eight nibbles of a word: column 0, 2, 4, 6,
1, 3, 5, 7 (the order its CUDA dequantizer reads them in).
"""

from __future__ import annotations

import torch

# Nibble j of an AWQ word holds column AWQ_ORDER[j] of its group of eight.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def values_per_word(bits: int) -> int:
    if 32 % bits:
        raise ValueError(f"{bits}-bit weights do not pack evenly into int32 words")
    return 32 // bits


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The unsigned values [..., n * 32/bits, ...] (int32) packed along `dim` of `packed`."""
    per_word = values_per_word(bits)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    words = packed.to(torch.int32).movedim(dim, -1)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], words.shape[-1] * per_word)
    return values.movedim(-1, dim)


def unpack_awq(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """AWQ GEMM words [rows, cols * bits/32] -> unsigned values [rows, cols], columns in order."""
    if bits != 4:
        raise ValueError(f"AWQ packs 4-bit weights only, got {bits} bits")
    shuffled = unpack_int32(packed, bits, dim=1)
    order = torch.tensor(AWQ_ORDER, device=packed.device).argsort()
    rows = shuffled.shape[0]
    return shuffled.view(rows, -1, 8)[:, :, order].reshape(rows, -1)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned `bits`-bit values -> int32 words along `dim` (the inverse of unpack_int32)."""
    per_word = values_per_word(bits)
    moved = values.to(torch.int64).movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (grouped << shifts).sum(-1)
    # Two's complement: the top value's high bit is int32's sign bit.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)
