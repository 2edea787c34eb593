"""Building a step's BatchLayout from per-sequence pieces, for the attention tests."""

from __future__ import annotations

import torch

from pagoda.backend.attention import BatchLayout

# (block table, tokens already cached, new tokens this step) of one sequence.
Piece = tuple[list[int], int, int]


def layout_from_pieces(
    pieces: list[Piece], block_size: int, device: torch.device | str = "cpu"
) -> BatchLayout:
    """The step feeding every piece's new tokens, back to back, each stored at its slot in the
    piece's own block table."""
    starts, slots = [0], []
    for table, context, new in pieces:
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(context, context + new)]
        starts.append(starts[-1] + new)
    return BatchLayout(
        query_start_loc=starts,
        context_lens=[context for _, context, _ in pieces],
        block_tables=[table for table, _, _ in pieces],
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_size=block_size,
    )
