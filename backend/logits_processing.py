"""The request-level logits processing that comes before sampling: logit_bias, min_tokens and the
repetition, presence and frequency penalties, each in place on float32 logits, row by row.

The penalties touch only the tokens a row has seen (gather and scatter over their occurrences)
rather than its whole vocabulary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pagoda.backend.device_transfer import to_device

if TYPE_CHECKING:
    from pagoda.backend.sampler import SamplingRow


def float32_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)


def _flat_occurrences(
    token_lists: Sequence[Sequence[int]], row_ids: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors of every occurrence of a token in each row's list, so the
    penalties touch only the tokens a row has seen instead of its whole vocabulary."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists])
    rows = torch.repeat_interleave(torch.tensor(list(row_ids), dtype=torch.long), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    if device.type == "cuda":
        rows, tokens = rows.pin_memory(), tokens.pin_memory()
    return rows.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Adds each row's logit_bias to its logits, in place."""
    vocab_size = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in row.params.logit_bias.items():
            if token_id < vocab_size:
                row_ids.append(i)
                token_ids.append(token_id)
                biases.append(bias)
    if row_ids:
        index = (
            to_device(row_ids, torch.long, logits.device),
            to_device(token_ids, torch.long, logits.device),
        )
        logits.index_put_(index, float32_tensor(biases, logits.device), accumulate=True)


def apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]
) -> None:
    """Sets the eos and stop_token_ids logits of rows still below min_tokens to -inf, in place."""
    vocab_size = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            banned = {*eos_token_ids, *row.params.stop_token_ids}
            kept = [token_id for token_id in banned if token_id < vocab_size]
            row_ids.extend([i] * len(kept))
            token_ids.extend(kept)
    if row_ids:
        index = (
            to_device(row_ids, torch.long, logits.device),
            to_device(token_ids, torch.long, logits.device),
        )
        logits[index] = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Hugging Face semantics, in place: the logit of every token present in the prompt or the
    output is divided by the penalty when positive and multiplied by it otherwise, once
    however often the token occurs."""
    selected = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not selected:
        return
    device = logits.device
    seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in selected]
    row_index, token_index = _flat_occurrences(seen, selected, device)
    penalties = torch.ones(len(rows), dtype=torch.float32, device=device)
    penalties[selected] = float32_tensor([rows[i].params.repetition_penalty for i in selected],
                                          device)
    penalty = penalties[row_index]
    seen_logits = logits[row_index, token_index]
    # NOTE: a token seen twice is written twice with the same value: penalized once.
    logits[row_index, token_index] = torch.where(
        seen_logits > 0, seen_logits / penalty, seen_logits * penalty
    )


def apply_presence_frequency_penalties(
    logits: torch.Tensor, rows: Sequence[SamplingRow]
) -> None:
    """OpenAI semantics over output tokens only, in place:
    logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    selected = [
        i
        for i, row in enumerate(rows)
        if (row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0)
        and row.output_token_ids
    ]
    if not selected:
        return
    device = logits.device
    row_index, token_index = _flat_occurrences(
        [rows[i].output_token_ids for i in selected], selected, device
    )
    counts = torch.zeros(len(rows), logits.shape[-1], dtype=torch.float32, device=device)
    counts.index_put_((row_index, token_index), torch.ones_like(row_index, dtype=torch.float32),
                      accumulate=True)
    frequency = torch.zeros(len(rows), dtype=torch.float32, device=device)
    presence = torch.zeros(len(rows), dtype=torch.float32, device=device)
    frequency[selected] = float32_tensor([rows[i].params.frequency_penalty for i in selected],
                                          device)
    presence[selected] = float32_tensor([rows[i].params.presence_penalty for i in selected],
                                         device)
    # NOTE: every occurrence of a token writes the same value, so the penalty applies once.
    logits[row_index, token_index] = (
        logits[row_index, token_index]
        - frequency[row_index] * counts[row_index, token_index]
        - presence[row_index]
    )
