"""Decode steps from static input buffers, padded to a batch-size bucket; on CUDA, replayed from
CUDA graphs.

A decode step of a small model is dozens of short kernels; launching them one by one from Python
costs more than running them. A CUDA graph records a step's kernels once and replays them with
one launch, but only over the same memory: so a decode step's inputs are copied into static
buffers, padded to the smallest captured batch size that holds them. A padding row feeds token 0
at position 0, writes its key and value to slot -1 (which every KV store skips), attends to one
key, and has no sampling row, so nothing reads its output. Prefill and mixed steps run eagerly.

With `capture=False` (CPU, and tests) the same padded buffers run eagerly, so everything but the
capture itself is exercised without a GPU.
"""

from __future__ import annotations

import logging
import time

import torch

from pagoda.backend.attention import AttentionBackend, DecodeBatch
from pagoda.backend.model_input import ModelInput
from pagoda.backend.models import CausalLM, KVCache

logger = logging.getLogger(__name__)


def cuda_graph_sizes(max_num_seqs: int) -> list[int]:
    """The default buckets: 1, 2, 4, 8, then every 8 up to 64, then every 16, up to the first
    that holds max_num_seqs (vLLM's spacing: dense where small batches differ most)."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + (8 if sizes[-1] < 64 else 16))
    return sizes


class DecodeGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        batch_sizes: list[int],
        max_model_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        max_batch = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_outputs: dict[int, torch.Tensor] = {}

    def supports(self, model_input: ModelInput) -> bool:
        """Whether `model_input` is a decode step this runner takes: one token per sequence, at
        most as many sequences as the largest bucket."""
        layout = model_input.layout
        return (
            0 < layout.num_seqs <= self.batch_sizes[-1]
            and model_input.num_tokens == layout.num_seqs
        )

    def hidden_states(self, model_input: ModelInput) -> torch.Tensor:
        """The model's final hidden states for the step's tokens, [num_seqs, hidden]; the new
        keys and values are in the cache afterwards."""
        num_seqs = model_input.layout.num_seqs
        batch_size = self._bucket(num_seqs)
        self._load(model_input, batch_size)
        graph = self._graphs.get(batch_size)
        if graph is None:
            return self._forward(batch_size)[:num_seqs]
        graph.replay()
        return self._graph_outputs[batch_size][:num_seqs]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool (a smaller
        bucket's intermediate tensors fit in what the larger ones allocated). Needs CUDA."""
        started = time.monotonic()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.batch_sizes):
            # A first eager run compiles the kernels and settles the allocator outside capture.
            self._forward(batch_size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_outputs[batch_size] = self._forward(batch_size)
            self._graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        logger.info(
            "captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s, %.0f MiB",
            len(self.batch_sizes), self.batch_sizes[-1], time.monotonic() - started,
            (free_before - free_after) / 2**20,
        )

    def _bucket(self, num_seqs: int) -> int:
        return next(size for size in self.batch_sizes if size >= num_seqs)

    def _load(self, model_input: ModelInput, batch_size: int) -> None:
        """Copy the step's inputs into the static buffers and reset the padding rows."""
        layout = model_input.layout
        num_seqs = layout.num_seqs
        self.input_ids[:num_seqs].copy_(model_input.input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(model_input.positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(layout.slot_mapping, non_blocking=True)
        tables = layout.block_tables
        width = max(len(table) for table in tables)
        padded = [table + [0] * (width - len(table)) for table in tables]
        # NOTE: from pinned memory the copies below do not wait for the GPU.
        host = torch.tensor(padded, dtype=torch.int32).view(num_seqs, width)
        seq_lens = torch.tensor(layout.seq_lens, dtype=torch.int32)
        if self.device.type == "cuda":
            host, seq_lens = host.pin_memory(), seq_lens.pin_memory()
        self.block_tables[:num_seqs, :width].copy_(host, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(seq_lens, non_blocking=True)
        padding = slice(num_seqs, batch_size)
        self.input_ids[padding] = 0
        self.positions[padding] = 0
        self.slot_mapping[padding] = -1
        self.seq_lens[padding] = 1
        self.block_tables[padding] = 0

    def _forward(self, batch_size: int) -> torch.Tensor:
        rows = slice(0, batch_size)
        batch = DecodeBatch(
            self.block_tables[rows], self.seq_lens[rows], self.slot_mapping[rows],
            self.block_size, self.max_model_len,
        )
        metadata = self.backend.prepare_decode(batch)
        return self.model(self.input_ids[rows], self.positions[rows], self.kv_caches, metadata)
