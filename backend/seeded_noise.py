"""Exp(1) noise for seeded sampling, reproducible from (seed, step) alone.

A seeded sequence must draw the same token whatever batch it is in and after a recompute, so its
noise cannot come from a generator shared with other rows. Each (seed, step) pair keys a
counter-based SplitMix64 stream; all seeded rows of a step are drawn in one batched computation.
"""

from __future__ import annotations

import hashlib

import torch


def stream_key(seed: int, step: int) -> int:
    """The 63-bit key of a seeded sequence's draw at one step, fixed by (seed, step) alone, so the
    sequence draws the same noise whatever its batch and after a recompute. Hashing the pair
    (rather than seed + step) keeps seeds s and s + 1 from replaying each other's streams
    shifted by one step."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's increment and finalizer constants (Steele, Lea and Flood, 2014), as int64.
_SPLITMIX_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_SPLITMIX_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_SPLITMIX_MIX_2 = _as_int64(0x94D049BB133111EB)


def counter_exponential(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[len(keys), vocab_size] Exp(1) draws: token t of row r gets the SplitMix64 output number
    t + 1 of the stream started at keys[r]. Counter-based, so all seeded rows are drawn in one
    batched computation instead of one torch.Generator per row and step (seeding a Mersenne
    Twister per row cost more than the draws)."""
    counters = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device)
    # int64 arithmetic wraps around, as SplitMix64's uint64 does; shifts must be logical.
    z = keys[:, None] + counters[None, :] * _SPLITMIX_GAMMA
    z = (z ^ _shift_right(z, 30)) * _SPLITMIX_MIX_1
    z = (z ^ _shift_right(z, 27)) * _SPLITMIX_MIX_2
    z = z ^ _shift_right(z, 31)
    # The top 53 bits as a float64 strictly inside (0, 1), so -log is finite and positive.
    uniform = (_shift_right(z, 11).double() + 0.5) * 2.0**-53
    return torch.log(uniform).neg_().float()


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> copies the sign bit)."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)
