"""The attention interface every backend implements, over one shared paged KV layout.

Per layer the cache is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]. A step's
batch is flat: the new tokens of all scheduled sequences back to back, sequence i owning tokens
query_start_loc[i]:query_start_loc[i+1], which sit at positions context_lens[i]..seq_lens[i]-1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pagoda.kernels import copy_blocks_reference


@dataclass(slots=True)
class BatchLayout:
    """Where a step's tokens come from and go to; built once per step by the model runner."""

    query_start_loc: list[int]  # [num_seqs + 1]
    context_lens: list[int]  # tokens already in the cache before this step, per sequence
    block_tables: list[list[int]]  # block ids per sequence, covering seq_lens
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of every new token
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def query_lens(self) -> list[int]:
        starts = self.query_start_loc
        return [starts[i + 1] - starts[i] for i in range(self.num_seqs)]

    @property
    def seq_lens(self) -> list[int]:
        return [ctx + q for ctx, q in zip(self.context_lens, self.query_lens)]


@dataclass(slots=True)
class DecodeBatch:
    """A decode-only batch as device tensors (the static buffers a CUDA graph replays): row i
    feeds one token, at position seq_lens[i] - 1."""

    block_tables: torch.Tensor  # [batch, max_blocks] int32; columns past a row's blocks unused
    seq_lens: torch.Tensor  # [batch] int32
    slot_mapping: torch.Tensor  # [batch] int64; -1 for padding rows
    block_size: int
    max_seq_len: int  # bounds every row's seq_len: what partitions the work, not this step's


class AttentionMetadata:
    """Whatever a backend precomputes from a BatchLayout once per step, shared by all layers."""

    layout: BatchLayout


class AttentionBackend(ABC):
    # Whether prepare_decode builds its metadata from the tensors alone, so that a CUDA graph
    # can capture a decode step and replay it over new buffer contents.
    supports_cuda_graphs: bool = False

    @abstractmethod
    def prepare(self, layout: BatchLayout, device: torch.device) -> AttentionMetadata:
        """Precompute the step's per-batch state (index tensors, masks) for all layers. What
        depends on a layer's sliding window is derived from it at most once per distinct window
        (a model may mix windowed and global layers)."""

    def prepare_decode(self, batch: DecodeBatch) -> AttentionMetadata:
        """Metadata of a decode-only batch given as device tensors. A backend whose decode a CUDA
        graph can capture overrides this to build it without reading the tensors back (the
        graph replays it with new contents). This default reads them back and calls prepare:
        right, but a host sync, so for eager runs only."""
        seq_lens = batch.seq_lens.tolist()
        tables = [
            row[: -(-seq_len // batch.block_size)]
            for row, seq_len in zip(batch.block_tables.tolist(), seq_lens)
        ]
        layout = BatchLayout(
            query_start_loc=list(range(len(seq_lens) + 1)),
            context_lens=[seq_len - 1 for seq_len in seq_lens],
            block_tables=tables,
            slot_mapping=batch.slot_mapping,
            block_size=batch.block_size,
        )
        return self.prepare(layout, batch.slot_mapping.device)

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
    ) -> torch.Tensor:
        """Store the new tokens' key/value in the cache, then attend.

        query [num_tokens, num_heads, head_dim]; key, value [num_tokens, num_kv_heads, head_dim].
        Each new token attends causally to its sequence's cached context and to the new tokens
        up to itself; with `sliding_window` only to the last `sliding_window` positions (itself
        included). With `soft_cap` every scaled score s becomes soft_cap * tanh(s / soft_cap)
        before the softmax. Both are the calling layer's own: layers of one model may differ.
        Returns [num_tokens, num_heads, head_dim].
        """

    def copy_blocks(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]
    ) -> None:
        """Copy-on-write: for every (source, target) block pair, block target of every layer's
        K and V becomes a copy of block source, as if all sources were read before any write."""
        if not copies:
            return
        device = kv_caches[0][0].device
        sources, targets = zip(*copies)
        copy_blocks_reference(
            kv_caches, torch.tensor(sources, device=device), torch.tensor(targets, device=device)
        )
