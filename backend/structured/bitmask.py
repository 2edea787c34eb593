"""Applying grammar bitmasks to logits: one batched pass over the rows that have one."""

from __future__ import annotations

import torch

from pagoda.backend.structured.grammar import GrammarMatcher

BITS_PER_WORD = 32


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def fill_bitmasks(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """[len(matchers), words] int32 on the CPU: each matcher's allowed next tokens (matchers of
    one engine, so of one vocabulary size)."""
    words = bitmask_words(matchers[0].vocab_size)
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask, row)
    return bitmask


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits[rows[i], t] to -inf, in place, for every token t whose bit is clear in
    bitmask[i]. logits: [batch, vocab]; rows: [k] int64; bitmask: [k, >= vocab / 32] int32, all
    on the logits' device."""
    vocab_size = logits.shape[-1]
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=logits.device)
    # NOTE: >> is arithmetic on int32, so the sign bit (token 31 of a word) still reads as 1.
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab_size].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
