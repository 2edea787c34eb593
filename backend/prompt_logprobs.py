"""Prompt logprobs: each prompt token's log-probability given the tokens before it, with its rank
and the top-k alternatives (vLLM's prompt_logprobs; what completions' echo with logprobs
reports), computed in the same forward as the prefill.

The logits at position p score the token at p + 1, so a prefill chunk of positions [start, end)
scores prompt tokens start + 1 .. end: the last row of a chunk scores the first token of the
next, and the first prompt token is never scored (its entry is None). A token is scored once: a
sequence recomputed after a preemption skips the tokens it has. A prefix cache hit would skip
positions, so requests that want prompt logprobs do not look the cache up (as vLLM's do).

Memory: logits are computed for a slice of rows at a time and only each row's top-k is kept, so a
long prompt costs [ROWS_PER_SLICE, vocab] floats at once, never [prompt, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.backend.model_output import PromptLogprobs
from pagoda.backend.models import CausalLM
from pagoda.backend.sequence import Sequence, SequenceGroup
from pagoda.backend.token_logprobs import score_tokens

ROWS_PER_SLICE = 256


@dataclass(slots=True)
class PromptLogprobRows:
    """The rows of a step's flat batch that score one sequence's prompt tokens."""

    seq_id: int
    first_row: int  # the batch row that scores token_ids[0]
    start: int  # prompt position of token_ids[0]
    token_ids: list[int]  # the prompt tokens scored, in order
    num_top: int


def prompt_logprob_rows(
    group: SequenceGroup, seq: Sequence, start: int, end: int, first_row: int
) -> PromptLogprobRows | None:
    """The rows among a chunk of positions [start, end) of `seq`, fed from batch row `first_row`,
    that score prompt tokens the group has no logprobs for yet; None when there are none."""
    scored = group.prompt_logprobs
    if scored is None:
        return None
    begin = max(start, len(scored) - 1)  # the row of position p scores token p + 1
    stop = min(end, seq.num_prompt_tokens - 1)
    if begin >= stop:
        return None
    assert group.params.prompt_logprobs is not None
    return PromptLogprobRows(
        seq.seq_id, first_row + begin - start, begin + 1, seq.token_ids[begin + 1 : stop + 1],
        group.params.prompt_logprobs,
    )


def compute_prompt_logprobs(
    model: CausalLM, hidden: torch.Tensor, rows: list[PromptLogprobRows]
) -> dict[int, PromptLogprobs]:
    """Score each sequence's rows of `hidden` [num_tokens, hidden_size] (the raw logits' float32
    log_softmax, as sampled tokens are scored)."""
    scored = {}
    for row in rows:
        tokens = []
        for offset in range(0, len(row.token_ids), ROWS_PER_SLICE):
            token_ids = row.token_ids[offset : offset + ROWS_PER_SLICE]
            first = row.first_row + offset
            logits = model.compute_logits(hidden[first : first + len(token_ids)])
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(token_ids, dtype=torch.long, device=hidden.device)
            tokens.extend(score_tokens(logprobs, targets, [row.num_top] * len(token_ids)))
        scored[row.seq_id] = PromptLogprobs(row.start, tokens)
    return scored


def record_prompt_logprobs(group: SequenceGroup, scored: PromptLogprobs) -> None:
    """Append the tokens scored in a step to the group's prompt logprobs, in prompt order."""
    entries = group.prompt_logprobs
    assert entries is not None and scored.start <= len(entries), "prompt tokens left unscored"
    for token in scored.tokens[len(entries) - scored.start :]:
        entries.append(token.as_logprobs())
