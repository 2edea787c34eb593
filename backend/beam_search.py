"""Beam search over a request's sequences, with transformers' scoring and stopping rules.

Each step every live beam contributes its next-token log-probabilities; the best 2 x width
continuations overall are ranked. Those among the top `width` that end (EOS, or the length limit)
become finished hypotheses scored `sum_logprobs / generated_len ** length_penalty`; the best
`width` that do not end become the next beams. The search stops as transformers' does:
`early_stopping=True` once `width` hypotheses are finished; False when the best running beam,
at its current length, can no longer beat the worst finished one; "never" the same but judging
the running beam at the maximum length when length_penalty > 0.

The scheduler calls `advance_beams` with each beam's candidates (the sampler's beam mode) when it
applies a step's output; it forks and frees the beams' KV blocks. The finished hypotheses become
completions, with their text, in output processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.model_output import BeamCandidates

if TYPE_CHECKING:
    from pagoda.backend.sequence import Sequence, SequenceGroup

# Score given to slots that must never be chosen, as transformers does.
IMPOSSIBLE = -1.0e9


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its generated tokens and its length-penalised score."""

    output_token_ids: list[int]
    score: float
    cumulative_logprob: float


@dataclass(slots=True)
class Continuation:
    """A running beam for the next step: parent beam (index into the step's beams) + token."""

    parent: int
    token_id: int
    cumulative_logprob: float


@dataclass(slots=True)
class BeamDecision:
    continuations: list[Continuation]
    done: bool


@dataclass(slots=True)
class BeamSearchState:
    width: int
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    stop_token_ids: frozenset[int]  # tokens that end a beam (EOS unless ignored, stop ids)
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most width
    improvable: bool = True  # transformers' "early stop heuristic unsatisfied"

    def step(
        self,
        candidates: list[BeamCandidates],
        beam_scores: list[float],
        beam_outputs: list[list[int]],
    ) -> BeamDecision:
        """Advance the search by one token.

        candidates: each live beam's best next tokens with their (processed) log-probabilities;
        beam_scores: the beams' running sums of log-probabilities; beam_outputs: their generated
        tokens.
        """
        # NOTE: every beam of a request has as many candidates (the same params); the sums are
        # float32, as transformers ranks, so near-ties break the same way.
        row_len = len(candidates[0].token_ids)
        totals = torch.tensor([c.log_probs for c in candidates], dtype=torch.float32)
        totals += torch.tensor(beam_scores, dtype=torch.float32)[:, None]
        num_candidates = min(2 * self.width, totals.numel())
        top_scores, top_indices = torch.topk(totals.flatten(), num_candidates)
        generated_len = len(beam_outputs[0]) + 1  # every beam has generated the same number
        reaches_limit = generated_len >= self.max_new_tokens

        all_full = len(self.finished) == self.width
        new_hypotheses: list[Hypothesis] = []
        continuations: list[Continuation] = []
        all_candidates_end = True
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_indices.tolist())):
            parent, column = divmod(index, row_len)
            token_id = candidates[parent].token_ids[column]
            ends = reaches_limit or token_id in self.stop_token_ids
            all_candidates_end &= ends
            if not ends:
                if len(continuations) < self.width:
                    continuations.append(Continuation(parent, token_id, score))
                continue
            # Only the top `width` candidates may finish; the rest exist to keep beams running.
            may_finish = rank < self.width and self.improvable and not (
                all_full and self.early_stopping is True
            )
            if may_finish:
                new_hypotheses.append(
                    Hypothesis(beam_outputs[parent] + [token_id],
                               score / generated_len**self.length_penalty, score)
                )
        merged = self.finished + new_hypotheses
        merged.sort(key=lambda h: h.score, reverse=True)
        self.finished = merged[: self.width]

        if continuations:
            self._update_improvable(continuations[0].cumulative_logprob, generated_len)
        done = (
            all_candidates_end
            or not continuations
            or not self.improvable
            or (len(self.finished) == self.width and self.early_stopping is True)
        )
        return BeamDecision(continuations=[] if done else continuations, done=done)

    def _update_improvable(self, best_running_score: float, generated_len: int) -> None:
        if len(self.finished) < self.width:
            return  # an empty slot can always be filled
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = generated_len
        best_possible = best_running_score / best_length**self.length_penalty
        worst_finished = min(h.score for h in self.finished)
        self.improvable = self.improvable and best_possible > worst_finished


def advance_beams(
    group: SequenceGroup, rows: list[tuple[Sequence, BeamCandidates]], blocks: BlockManager
) -> None:
    """One beam-search step for a request: rank the continuations of its beams (`rows`: each
    computed beam with its candidates), then fork the beams that continue more than once, drop
    the ones that do not continue, or finish the request with its best hypotheses."""
    state = group.beam
    assert state is not None
    beams = [seq for seq, _ in rows]
    # NOTE: the scheduler gives every beam its candidates in the same step (see
    # Scheduler._plan_beam_recompute); only the shared prompt prefill has a single row.
    assert len(beams) == len(group.live_seqs) or group.shares_prompt_prefill
    decision = state.step(
        [candidates for _, candidates in rows],
        [beam.cumulative_logprob for beam in beams],
        [beam.output_token_ids for beam in beams],
    )
    if decision.done:
        group.beam_results = state.finished[: group.params.n]
        for seq in group.live_seqs:
            seq.finish("stop")
        return
    # NOTE: fork every extra child before appending any token: a child copies its parent's
    # tokens as they were when the parent was computed.
    continuing: set[int] = set()
    children: list[tuple[Sequence, Continuation]] = []
    for continuation in decision.continuations:
        parent = beams[continuation.parent]
        if continuation.parent in continuing:
            child = parent.fork()
            blocks.fork(parent, child)
            children.append((child, continuation))
        else:
            continuing.add(continuation.parent)
            children.append((parent, continuation))
    for child, continuation in children:
        child.token_ids.append(continuation.token_id)
        child.cumulative_logprob = continuation.cumulative_logprob
    for index, beam in enumerate(beams):
        if index not in continuing:
            blocks.free(beam)
    # Samples that rode on the shared prompt prefill hold no blocks and are simply dropped.
    group.seqs = [child for child, _ in children]
