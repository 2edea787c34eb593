"""What the engine returns for a request: vLLM-shaped RequestOutput and CompletionOutput."""

from __future__ import annotations

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


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Why the engine failed this request, when it did: the request's fault (it outgrew the KV
    # cache) or, with `error.internal`, the server's (the model raised on it).
    error: EngineError | None = None
