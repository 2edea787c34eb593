"""What one model step returns to the scheduler: plain per-sequence results keyed by sequence id."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.backend.outputs import Logprob


@dataclass(slots=True)
class SampledToken:
    """A token chosen for one sequence, with its log-probability under the raw logits."""

    token_id: int
    logprob: float  # raw float32 log_softmax of the chosen token, always filled
    rank: int  # 1-based rank under the raw distribution; 0 when params.logprobs is None
    top_logprobs: list[tuple[int, float]]  # params.logprobs best (token_id, logprob), best first

    def as_logprobs(self) -> dict[int, Logprob]:
        """The top alternatives (ranked 1, 2, ...) and the token itself, by token id."""
        entry = {token_id: Logprob(logprob, rank) for rank, (token_id, logprob) in
                 enumerate(self.top_logprobs, start=1)}
        entry[self.token_id] = Logprob(self.logprob, self.rank)
        return entry


@dataclass(slots=True)
class PromptLogprobs:
    """A run of one sequence's prompt tokens scored in this step: tokens[i] is the prompt token
    at position `start + i`, scored by the logits of the position before it."""

    start: int
    tokens: list[SampledToken]


@dataclass(slots=True)
class PooledHidden:
    """A pooling sequence's final hidden states of prompt positions [start, start +
    num_positions) fed in this step, pooled: their sum (mean pooling) or the last one's."""

    start: int
    num_positions: int
    hidden: torch.Tensor  # [hidden_size] float32, on the host


@dataclass(slots=True)
class BeamCandidates:
    """A beam's best next tokens, best first, ranked by their log-probabilities after the
    request's logits processing (what beam search scores). 2 x width of them are enough: the
    step's best 2 x width continuations over all beams are among them."""

    token_ids: list[int]
    log_probs: list[float]


@dataclass(slots=True)
class ModelOutput:
    """A step's results by sequence id. Sequences that only fed tokens (a prefill chunk that
    leaves tokens for later) have no entry."""

    # Tokens each sampled sequence accepts this step, in order: one per sequence today, several
    # once speculative decoding verifies proposals.
    tokens: dict[int, list[SampledToken]] = field(default_factory=dict)
    # Beam search sequences: their candidates, for the scheduler to rank across the request.
    beam_candidates: dict[int, BeamCandidates] = field(default_factory=dict)
    # Sequences that want prompt logprobs: those of the prompt positions this step fed.
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)
    # Pooling (embedding) sequences: their part of the pooled final hidden states.
    pooled: dict[int, PooledHidden] = field(default_factory=dict)
