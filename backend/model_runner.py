"""Runs one scheduled step: flat batch -> attention metadata -> model forward -> sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.backend.attention import AttentionBackend, BatchLayout
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.models.llama import KVCache, LlamaForCausalLM
from pagoda.backend.sampler import SampledToken, Sampler, SamplingRow
from pagoda.backend.scheduler import ScheduledSequence
from pagoda.backend.sequence import Sequence


@dataclass(slots=True)
class StepResult:
    """What a step produced, keyed by index into the scheduled list."""

    # Sampled tokens: the sequence's first, then one per follower.
    samples: dict[int, list[SampledToken]] = field(default_factory=dict)
    # Beam search: the sequence's processed next-token log-probabilities [vocab], float32.
    beam_log_probs: dict[int, torch.Tensor] = field(default_factory=dict)


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
    def execute(
        self, scheduled: list[ScheduledSequence], block_copies: list[tuple[int, int]]
    ) -> StepResult:
        """Apply pending copy-on-write copies, feed every scheduled sequence its new tokens, and
        for each one whose tokens are then all computed: sample its next token (and its
        followers'), or for beam search return its next-token log-probabilities."""
        self.backend.copy_blocks(self.kv_caches, block_copies)
        result = StepResult()
        if not scheduled:
            return result
        input_ids, positions, layout = self._prepare(scheduled)
        metadata = self.backend.prepare(layout, self.device, self.model.sliding_window)
        hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        finishing = [i for i, item in enumerate(scheduled) if item.samples_next_token]
        if not finishing:
            return result
        last_rows = torch.tensor(
            [layout.query_start_loc[i + 1] - 1 for i in finishing], device=self.device
        )
        logits = self.model.compute_logits(hidden[last_rows])
        beam_rows = [row for row, i in enumerate(finishing) if _is_beam(scheduled[i])]
        sample_rows = [row for row, i in enumerate(finishing) if not _is_beam(scheduled[i])]
        if beam_rows:
            self._beam_log_probs(logits, beam_rows, finishing, scheduled, result)
        if sample_rows:
            self._sample(logits, sample_rows, finishing, scheduled, result)
        return result

    def _beam_log_probs(self, logits: torch.Tensor, rows: list[int], finishing: list[int],
                        scheduled: list[ScheduledSequence], result: StepResult) -> None:
        """Beam search ranks by log-probabilities after the request's logits processing
        (penalties, bias), as transformers applies its processors to log-probabilities."""
        items = [scheduled[finishing[row]] for row in rows]
        log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
        processed = self.sampler.process_logits(log_probs, [_sampling_row(i.seq, i) for i in items])
        for row, processed_row in zip(rows, processed):
            result.beam_log_probs[finishing[row]] = processed_row

    def _sample(self, logits: torch.Tensor, rows: list[int], finishing: list[int],
                scheduled: list[ScheduledSequence], result: StepResult) -> None:
        """One token per sequence; followers draw from their leader's logits row."""
        logits_rows: list[int] = []
        owners: list[int] = []
        sampling_rows: list[SamplingRow] = []
        for row in rows:
            item = scheduled[finishing[row]]
            for seq in (item.seq, *item.followers):
                logits_rows.append(row)
                owners.append(finishing[row])
                sampling_rows.append(_sampling_row(seq, item))
        tokens = self.sampler(logits[torch.tensor(logits_rows, device=self.device)], sampling_rows)
        for owner, token in zip(owners, tokens):
            result.samples.setdefault(owner, []).append(token)

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


def _is_beam(item: ScheduledSequence) -> bool:
    return item.group.params.use_beam_search


def _sampling_row(seq: Sequence, item: ScheduledSequence) -> SamplingRow:
    return SamplingRow(
        params=item.group.params,
        prompt_token_ids=item.group.prompt_token_ids,
        output_token_ids=seq.output_token_ids,
        seed=seq.seed,
    )
