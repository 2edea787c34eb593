"""Requests inside the engine: a SequenceGroup holds the sequences one request samples."""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.backend.detokenizer import IncrementalDetokenizer
from pagoda.backend.errors import EngineError
from pagoda.backend.outputs import Logprob, RequestMetrics
from pagoda.backend.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.backend.beam_search import BeamSearchState, Hypothesis
    from pagoda.backend.pooling import PoolingState
    from pagoda.backend.structured import GrammarMatcher

# NOTE: one counter for the process, so sequences forked anywhere (beam search in the scheduler)
# never collide with those a request starts with.
_seq_ids = itertools.count()


class GroupStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    index: int  # position among the request's samples
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    seed: int | None
    detokenizer: IncrementalDetokenizer | None  # None for beams: their text is made at the end
    # How many leading tokens have their K/V in the cache; the rest are fed to the model next.
    num_computed_tokens: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Structured outputs: where this sample is in its grammar. It advances with every appended
    # token and never steps back: a preempted sequence keeps its tokens, so its state stays true.
    grammar: GrammarMatcher | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids), kw_only=True)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def reset_for_recompute(self) -> None:
        """After preemption: all K/V is gone; prompt and generated tokens are fed again."""
        self.num_computed_tokens = 0

    def fork(self) -> Sequence:
        """A new beam continuing this one: a new id with the same tokens and state (the caller
        forks its KV blocks). Beams carry no detokenizer: their text is made once they finish."""
        return Sequence(
            index=self.index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            seed=self.seed,
            detokenizer=None,
            num_computed_tokens=self.num_computed_tokens,
            cumulative_logprob=self.cumulative_logprob,
        )


@dataclass(eq=False)
class SequenceGroup:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    status: GroupStatus = GroupStatus.WAITING
    error: EngineError | None = None
    want_logprobs: bool = False
    beam: BeamSearchState | None = None
    beam_results: list[Hypothesis] | None = None  # the best hypotheses, once finished
    # With params.prompt_logprobs: one entry per prompt token scored so far (the first is None).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # A pooling (embedding) request: prefill only, its final hidden states pooled.
    pooling: PoolingState | None = None

    @property
    def arrival_time(self) -> float:
        return self.metrics.arrival_time

    @property
    def live_seqs(self) -> list[Sequence]:
        return [seq for seq in self.seqs if not seq.is_finished]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def prefill_only(self) -> bool:
        """It feeds its prompt and is done, drawing no token (max_tokens=0, pooling)."""
        return self.params.max_tokens == 0 or self.pooling is not None

    @property
    def feeds_every_prompt_position(self) -> bool:
        """Whether every prompt position must run through the model (prompt logprobs, mean
        pooling), so the prefix cache must not serve any."""
        return self.prompt_logprobs is not None or (
            self.pooling is not None and self.pooling.needs_every_position
        )

    @property
    def shares_prompt_prefill(self) -> bool:
        """Several samples that have not drawn a token yet: one prefill serves them all."""
        return len(self.seqs) > 1 and all(seq.num_output_tokens == 0 for seq in self.seqs)

    def common_history_len(self) -> int:
        """How many leading tokens all live samples have in common, leaving each at least its
        last token of its own (the one whose logits give its next token)."""
        seqs = self.live_seqs
        length = min(len(seq.token_ids) for seq in seqs) - 1
        lead = seqs[0].token_ids
        for seq in seqs[1:]:
            # The prompt is common by construction: compare only the generated tokens.
            position = min(seq.num_prompt_tokens, length)
            while position < length and seq.token_ids[position] == lead[position]:
                position += 1
            length = position
        return length

    def fail(self, error: EngineError) -> None:
        self.error = error
        for seq in self.live_seqs:
            seq.finish("error")

    def abort(self) -> None:
        for seq in self.live_seqs:
            seq.finish("abort")


def sample_seed(request_seed: int | None, sample_index: int) -> int | None:
    """Each sample of a seeded request gets its own reproducible stream; sample 0 uses the
    request's seed as is, so n=1 matches a plain seeded request."""
    if request_seed is None or sample_index == 0:
        return request_seed
    digest = hashlib.blake2b(f"{request_seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
