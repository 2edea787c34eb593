"""What one model step returns to the scheduler: plain per-sequence results keyed by sequence id."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SampledToken:
    """A token chosen for one sequence, with its log-probability under the raw logits."""

    token_id: int
    logprob: float  # raw float32 log_softmax of the chosen token, always filled
    rank: int  # 1-based rank under the raw distribution; 0 when params.logprobs is None
    top_logprobs: list[tuple[int, float]]  # params.logprobs best (token_id, logprob), best first


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
