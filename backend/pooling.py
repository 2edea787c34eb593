"""Embeddings from a generation model: a pooling request runs its prompt through the model
(prefill only: no token is drawn) and pools the final hidden states, after the final norm: the
last token's, or the mean over every position; L2-normalized unless asked otherwise.

A pooling prompt is prefilled in chunks under the token budget like any other. Mean pooling adds
each chunk's rows up, so every position must run through the model: such requests bypass the
prefix cache (a hit would skip positions) and a recomputed one (after a preemption) pools only
the positions it has not pooled yet. Last-token pooling takes the last row of the last chunk,
which the prefix cache never serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.backend.model_output import PooledHidden
from pagoda.backend.pooling_params import PoolingType


@dataclass(slots=True)
class PoolingRows:
    """The rows of a step's flat batch one pooling sequence pools from."""

    seq_id: int
    first_row: int
    num_rows: int
    start: int  # prompt position of the first row
    mean: bool  # sum the rows (mean pooling), or take the last one


class PoolingState:
    """A pooling request's pooled hidden state, as its prompt is fed chunk by chunk."""

    def __init__(self, pooling_type: PoolingType, normalize: bool, num_prompt_tokens: int) -> None:
        self.pooling_type = pooling_type
        self.normalize = normalize
        self.num_prompt_tokens = num_prompt_tokens
        self._pooled: torch.Tensor | None = None
        self._num_positions = 0  # leading positions pooled so far (mean pooling)

    @property
    def needs_every_position(self) -> bool:
        return self.pooling_type is PoolingType.MEAN

    def rows(self, seq_id: int, start: int, end: int, first_row: int) -> PoolingRows | None:
        """The rows to pool among a chunk of positions [start, end) fed from batch row
        `first_row`; None when the chunk has none."""
        if self.pooling_type is PoolingType.LAST:
            if end < self.num_prompt_tokens:
                return None
            return PoolingRows(seq_id, first_row + end - 1 - start, 1, end - 1, mean=False)
        begin = max(start, self._num_positions)
        if begin >= end:
            return None
        return PoolingRows(seq_id, first_row + begin - start, end - begin, begin, mean=True)

    def add(self, pooled: PooledHidden) -> None:
        if self.pooling_type is PoolingType.LAST:
            self._pooled = pooled.hidden
            return
        assert pooled.start == self._num_positions, "mean pooling skipped or repeated positions"
        self._pooled = pooled.hidden if self._pooled is None else self._pooled + pooled.hidden
        self._num_positions += pooled.num_positions

    def embedding(self) -> list[float] | None:
        """The embedding, once the whole prompt is pooled (None before: an aborted or failed
        request has none)."""
        vector = self._pooled
        if vector is None or (
            self.needs_every_position and self._num_positions < self.num_prompt_tokens
        ):
            return None
        if self.pooling_type is PoolingType.MEAN:
            vector = vector / self._num_positions
        if self.normalize:
            vector = torch.nn.functional.normalize(vector, dim=-1)
        return vector.tolist()


def pool_hidden(hidden: torch.Tensor, rows: list[PoolingRows]) -> dict[int, PooledHidden]:
    """Each pooling sequence's rows of `hidden` [num_tokens, hidden_size], pooled in float32."""
    pooled = {}
    for row in rows:
        states = hidden[row.first_row : row.first_row + row.num_rows].float()
        value = states.sum(dim=0) if row.mean else states[-1]
        pooled[row.seq_id] = PooledHidden(row.start, row.num_rows, value.cpu())
    return pooled
