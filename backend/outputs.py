"""What the engine returns for a request: vLLM-shaped RequestOutput and CompletionOutput."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagoda.backend.errors import EngineError


@dataclass(slots=True)
class Logprob:
    """One token's log-probability under the model's raw distribution, and its rank there
    (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: the chosen token and the top-k alternatives, by token id.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: the prompt token and the top-k alternatives, by token id; None for
# the first token, which nothing before it scores.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    score: float | None = None  # beam search: the length-penalised score it was ranked by

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, newer: CompletionOutput) -> CompletionOutput:
        """This delta followed by the `newer` delta of the same completion, as one delta."""
        logprobs = None
        if self.logprobs is not None and newer.logprobs is not None:
            logprobs = self.logprobs + newer.logprobs
        return dataclasses.replace(
            newer, text=self.text + newer.text, token_ids=self.token_ids + newer.token_ids,
            logprobs=logprobs,
        )


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """One request's state after a step. With RequestOutputKind.DELTA, each completion holds only
    what is new since the request's previous output (text, token_ids, logprobs); otherwise all
    of it. cumulative_logprob, finish_reason and the metrics are always current."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Why the engine failed this request, when it did: the request's fault (it outgrew the KV
    # cache) or, with `error.internal`, the server's (the model raised on it).
    error: EngineError | None = None
    delta: bool = False  # the completions hold only what is new (RequestOutputKind.DELTA)
    # With SamplingParams.prompt_logprobs: in every output, but only the first of a DELTA request.
    prompt_logprobs: PromptLogprobs | None = None
    # A pooling (embedding) request's pooled final hidden state, in its final output.
    embedding: list[float] | None = None

    def add(self, newer: RequestOutput) -> RequestOutput:
        """This output followed by `newer` (of the same request) as one: what a consumer that
        read neither would want. Deltas are concatenated; otherwise the newer one replaces it."""
        if not newer.delta:
            return newer
        merged = {completion.index: completion for completion in self.outputs}
        for completion in newer.outputs:
            older = merged.get(completion.index)
            merged[completion.index] = completion if older is None else older.add(completion)
        return dataclasses.replace(
            newer, outputs=sorted(merged.values(), key=lambda c: c.index),
            prompt_logprobs=self.prompt_logprobs or newer.prompt_logprobs,
        )
