"""Attention with the Triton kernels of `pagoda.kernels.triton`, on the shared paged KV layout.

Sequences feeding one token (decodes) go to the paged decode kernel, split-K over long contexts;
sequences feeding several (prefills and prefill chunks) go to the prefill kernel, which reads
their context and the new tokens from the cache once the new tokens are stored. Importing this
module imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.backend.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    DecodeBatch,
)
from pagoda.backend.device_transfer import to_device
from pagoda.kernels import copy_blocks_reference
from pagoda.kernels.triton import (
    PrefillTiles,
    copies_overlap,
    copy_blocks_triton,
    interpreting,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    store_kv_triton,
    tokens_per_tile,
)


@dataclass(slots=True)
class TritonAttentionMetadata(AttentionMetadata):
    # None for a decode batch built from a CUDA graph's static buffers (prepare_decode).
    layout: BatchLayout | None
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's key and value go
    # Sizes the decode launch (partitions of the longest decoding context); a runtime size, not
    # a compile-time constant, so a new maximum every step compiles nothing new.
    decode_max_seq_len: int
    # The whole batch, int32: what the prefill kernel indexes by sequence.
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    query_start_loc: torch.Tensor  # [num_seqs + 1]
    context_lens: torch.Tensor  # [num_seqs]
    prefill_seqs: list[int]  # sequences feeding more than one token
    # The decodes as a batch of their own.
    decode_rows: torch.Tensor  # [num_decodes] rows of the flat batch
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_seq_lens: torch.Tensor  # [num_decodes]
    # Prefill tiles depend on the model's group size, known at the first forward; built once.
    _tiles: dict[int, PrefillTiles] = field(default_factory=dict)

    @property
    def all_decode(self) -> bool:
        return not self.prefill_seqs

    def prefill_tiles(self, tokens: int) -> PrefillTiles:
        assert self.layout is not None, "a decode batch has no prefill"
        if tokens not in self._tiles:
            self._tiles[tokens] = PrefillTiles.build(
                self.prefill_seqs, self.layout.query_lens, tokens, self.block_tables.device
            )
        return self._tiles[tokens]


def require_runnable_on(device: torch.device) -> None:
    """Triton kernels take CUDA tensors, or CPU tensors when this process interprets them."""
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"the Triton attention backend runs on {device.type} only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before starting, or use PAGODA_ATTENTION_BACKEND=torch"
        )


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graphs = True

    def prepare(self, layout: BatchLayout, device: torch.device) -> TritonAttentionMetadata:
        require_runnable_on(device)
        query_lens = layout.query_lens
        decodes = [i for i, query_len in enumerate(query_lens) if query_len == 1]
        max_blocks = max(len(table) for table in layout.block_tables)
        tables = [table + [0] * (max_blocks - len(table)) for table in layout.block_tables]
        seq_lens = layout.seq_lens
        return TritonAttentionMetadata(
            layout=layout,
            slot_mapping=layout.slot_mapping,
            decode_max_seq_len=max((seq_lens[i] for i in decodes), default=0),
            block_tables=_int32(tables, device),
            query_start_loc=_int32(layout.query_start_loc, device),
            context_lens=_int32(layout.context_lens, device),
            prefill_seqs=[i for i, query_len in enumerate(query_lens) if query_len > 1],
            decode_rows=to_device([layout.query_start_loc[i] for i in decodes], torch.long, device),
            decode_block_tables=_int32([tables[i] for i in decodes], device).view(
                len(decodes), max_blocks
            ),
            decode_seq_lens=_int32([seq_lens[i] for i in decodes], device),
        )

    def prepare_decode(self, batch: DecodeBatch) -> TritonAttentionMetadata:
        """The batch's own tensors, nothing read back, so a CUDA graph can replay it with new
        contents. The decode launch is sized for batch.max_seq_len (the longest a sequence may
        be), not this step's longest context: partitions past a sequence's end return at once."""
        device = batch.slot_mapping.device
        require_runnable_on(device)
        no_prefill = torch.empty(0, dtype=torch.int32, device=device)
        return TritonAttentionMetadata(
            layout=None,
            slot_mapping=batch.slot_mapping,
            decode_max_seq_len=batch.max_seq_len,
            block_tables=batch.block_tables,
            query_start_loc=no_prefill,
            context_lens=no_prefill,
            prefill_seqs=[],
            decode_rows=torch.arange(batch.seq_lens.shape[0], device=device),
            decode_block_tables=batch.block_tables,
            decode_seq_lens=batch.seq_lens,
        )

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
        assert isinstance(metadata, TritonAttentionMetadata)
        store_kv_triton(key, value, key_cache, value_cache, metadata.slot_mapping)
        # The window and the cap are kernel arguments: nothing in the metadata depends on them.
        layer = (scale, sliding_window, soft_cap)
        if metadata.all_decode:
            return self._decode(query, key_cache, value_cache, metadata, *layer)
        output = torch.empty_like(query)
        if metadata.decode_rows.numel():
            rows = metadata.decode_rows
            output[rows] = self._decode(query[rows], key_cache, value_cache, metadata, *layer)
        num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
        paged_prefill_attention_triton(
            query, key_cache, value_cache, metadata.block_tables, metadata.query_start_loc,
            metadata.context_lens, scale,
            tiles=metadata.prefill_tiles(tokens_per_tile(num_heads, num_kv_heads)),
            sliding_window=sliding_window, out=output, soft_cap=soft_cap,
        )
        return output

    def copy_blocks(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]
    ) -> None:
        if not copies:
            return
        device = kv_caches[0][0].device
        sources, targets = (to_device(ids, torch.long, device) for ids in zip(*copies))
        # A block both read and written needs every read before any write, which the parallel
        # kernel does not order; that only happens when a freed block is reused within a step.
        if copies_overlap(copies):
            copy_blocks_reference(kv_caches, sources, targets)
        else:
            copy_blocks_triton(kv_caches, sources, targets)

    @staticmethod
    def _decode(
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: TritonAttentionMetadata,
        scale: float,
        sliding_window: int | None,
        soft_cap: float | None,
    ) -> torch.Tensor:
        return paged_decode_attention_triton(
            query, key_cache, value_cache, metadata.decode_block_tables, metadata.decode_seq_lens,
            scale, max_seq_len=metadata.decode_max_seq_len, sliding_window=sliding_window,
            soft_cap=soft_cap,
        )


def _int32(values: list, device: torch.device) -> torch.Tensor:
    return to_device(values, torch.int32, device)
