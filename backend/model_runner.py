"""Runs one scheduled step: flat batch -> attention metadata -> model forward -> sampler."""

from __future__ import annotations

import torch

from pagoda.backend.attention import AttentionBackend, BatchLayout
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.models.llama import KVCache, LlamaForCausalLM
from pagoda.backend.sampler import SampledToken, Sampler, SamplingRow
from pagoda.backend.scheduler import ScheduledSequence


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        block_manager: BlockManager,
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.blocks = block_manager
        self.backend = backend
        self.sampler = sampler
        self.device = device

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> list[SampledToken | None]:
        """Feed every scheduled sequence its new tokens; sample a next token for each sequence
        whose tokens are then all computed (None for the others, mid-prefill)."""
        input_ids, positions, layout = self._prepare(scheduled)
        metadata = self.backend.prepare(layout, self.device, self.model.sliding_window)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        sampling = [i for i, item in enumerate(scheduled) if item.samples_next_token]
        results: list[SampledToken | None] = [None] * len(scheduled)
        if not sampling:
            return results
        last_rows = torch.tensor(
            [layout.query_start_loc[i + 1] - 1 for i in sampling], device=self.device
        )
        logits = self.model.compute_logits(hidden[last_rows])
        rows = [_sampling_row(scheduled[i]) for i in sampling]
        for i, token in zip(sampling, self.sampler(logits, rows)):
            results[i] = token
        return results

    def _prepare(
        self, scheduled: list[ScheduledSequence]
    ) -> tuple[torch.Tensor, torch.Tensor, BatchLayout]:
        block_size = self.blocks.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        for item in scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = self.blocks.block_ids(seq.seq_id)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
            query_start_loc.append(len(input_ids))
            context_lens.append(start)
            block_tables.append(table)
        layout = BatchLayout(
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_size=block_size,
        )
        return (
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            layout,
        )


def _sampling_row(item: ScheduledSequence) -> SamplingRow:
    seq = item.seq
    return SamplingRow(
        params=item.group.params,
        prompt_token_ids=item.group.prompt_token_ids,
        output_token_ids=seq.output_token_ids,
        seed=seq.seed,
    )
