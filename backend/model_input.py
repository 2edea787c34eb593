"""A step's inputs as plain data: what the model runner reads, and nothing else.

`build_model_input` turns the scheduler's decisions into tensors and lists: the new tokens of
every scheduled sequence back to back, where their keys and values go in the paged cache, each
sequence's block table, and one sampling row for every sequence that draws its next token (the
samples riding on a shared prompt prefill read their leader's logits row). Nothing here refers
to a live Sequence or SequenceGroup, so the same input can be padded to a fixed batch size (a CUDA
graph bucket) or sent to another process (tensor parallelism) without touching the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.backend.attention import BatchLayout
from pagoda.backend.device_transfer import to_device
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.long_context import LongContext
from pagoda.backend.pooling import PoolingRows
from pagoda.backend.prompt_logprobs import PromptLogprobRows, prompt_logprob_rows
from pagoda.backend.sampler import SamplingRow
from pagoda.backend.scheduler import SchedulerOutput
from pagoda.backend.structured import GrammarMatcher, fill_bitmasks


@dataclass(slots=True)
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens] int64: every scheduled sequence's new tokens
    positions: torch.Tensor  # [num_tokens] int64
    layout: BatchLayout  # query start offsets, context lengths, block tables, slot mapping
    # Rows of the flat batch whose hidden state gives a next-token distribution, one per
    # sampling row (several rows may name the same batch row: samples sharing a prefill).
    logits_indices: torch.Tensor  # [num_sampling_rows] int64
    sampling_rows: list[SamplingRow] = field(default_factory=list)
    # Copy-on-write (source, target) block copies to apply before the forward.
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Per sequence that wants prompt logprobs: the rows scoring its prompt tokens.
    prompt_logprob_rows: list[PromptLogprobRows] = field(default_factory=list)
    # Per pooling (embedding) sequence: the rows whose final hidden states it pools.
    pooling_rows: list[PoolingRows] = field(default_factory=list)
    # [num_tokens] bool, for a model with a long-context threshold only: whether each token's
    # sequence is longer than it (see long_context.py).
    long_context: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def build_model_input(
    scheduler_output: SchedulerOutput,
    blocks: BlockManager,
    device: torch.device,
    long_context: LongContext | None = None,
) -> ModelInput:
    block_size = blocks.block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    context_lens: list[int] = []
    block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    sampling_rows: list[SamplingRow] = []
    prompt_rows: list[PromptLogprobRows] = []
    pooling_rows: list[PoolingRows] = []
    grammars: list[tuple[SamplingRow, GrammarMatcher]] = []
    long_flags: list[bool] = []
    for item in scheduler_output.scheduled:
        seq, group = item.seq, item.group
        start = seq.num_computed_tokens
        end = start + item.num_new_tokens
        table = blocks.block_ids(seq.seq_id)
        if long_context is not None:
            long_flags.extend([long_context.is_long(len(seq.token_ids))] * item.num_new_tokens)
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        query_start_loc.append(len(input_ids))
        context_lens.append(start)
        block_tables.append(table)
        first_row = len(input_ids) - item.num_new_tokens
        if (rows := prompt_logprob_rows(group, seq, start, end, first_row)) is not None:
            prompt_rows.append(rows)
        if group.pooling is not None:
            pooled = group.pooling.rows(seq.seq_id, start, end, first_row)
            if pooled is not None:
                pooling_rows.append(pooled)
        if not item.samples_next_token or group.prefill_only:
            continue
        # A beam search group ranks its beams together; the samples riding on its shared
        # prompt prefill are not drawn (beam search forks the beams it keeps).
        samples = [seq] if group.params.use_beam_search else [seq, *item.followers]
        for sample in samples:
            logits_indices.append(len(input_ids) - 1)
            sampling_rows.append(SamplingRow(
                seq_id=sample.seq_id,
                params=group.params,
                prompt_token_ids=group.prompt_token_ids,
                output_token_ids=sample.output_token_ids,
                seed=sample.seed,
            ))
            if sample.grammar is not None:
                grammars.append((sampling_rows[-1], sample.grammar))
    if grammars:
        # Filled here, on the host, from the matchers' state after the previous step's tokens.
        bitmask = fill_bitmasks([matcher for _, matcher in grammars])
        for index, (row, _) in enumerate(grammars):
            row.token_bitmask = bitmask[index]
    layout = BatchLayout(
        query_start_loc=query_start_loc,
        context_lens=context_lens,
        block_tables=block_tables,
        slot_mapping=to_device(slots, torch.long, device),
        block_size=block_size,
    )
    return ModelInput(
        input_ids=to_device(input_ids, torch.long, device),
        positions=to_device(positions, torch.long, device),
        layout=layout,
        logits_indices=to_device(logits_indices, torch.long, device),
        sampling_rows=sampling_rows,
        block_copies=scheduler_output.block_copies,
        prompt_logprob_rows=prompt_rows,
        pooling_rows=pooling_rows,
        long_context=None if long_context is None else to_device(long_flags, torch.bool, device),
    )
