"""Grammar bitmasks: filled on the host per constrained sequence, applied to the logits in one
batched call (xgrammar's kernels: C++ on CPU, Triton on CUDA; the layout is llguidance's too)."""

from __future__ import annotations

import torch
import xgrammar

from pagoda.backend.structured.grammar import GrammarMatcher

BITS_PER_WORD = 32


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def fill_bitmasks(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """[len(matchers), words] int32 on the CPU: each matcher's allowed next tokens (matchers of
    one engine, so of one vocabulary size)."""
    words = bitmask_words(matchers[0].vocab_size)
    bitmask = torch.empty(len(matchers), words, dtype=torch.int32)
    filters: dict[int, tuple[torch.Tensor, list[int]]] = {}
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmask, row)
        token_filter = matcher.token_filter
        if token_filter is not None:
            filters.setdefault(id(token_filter), (token_filter, []))[1].append(row)
    # NOTE: one AND per distinct filter (matchers of one backend share theirs), not per row.
    for token_filter, rows in filters.values():
        if len(rows) == len(matchers):
            bitmask &= token_filter
        else:
            bitmask[rows] &= token_filter
    return bitmask


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None
) -> None:
    """Set logits[i, t] to -inf, in place, for each row i in `rows` (all rows when None) and
    every token t whose bit is clear in bitmask[i]. logits: [batch, vocab] float32; bitmask:
    [batch, >= vocab / 32] int32 on the logits' device (rows not in `rows` are not read)."""
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1],
                                         indices=rows)
