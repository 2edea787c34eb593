"""Sampling parameters of one request, with vLLM's and OpenAI's field names.

Validated on construction: a bad value raises InvalidParameter (a ValueError) carrying the field,
so every adapter can turn it into its own protocol's error without re-checking anything.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pagoda.backend.errors import InvalidParameter
from pagoda.backend.structured.params import StructuredOutputsParams

# Above this, a temperature is treated as greedy: dividing logits by it would only amplify
# rounding noise (the same cut-off vLLM uses).
GREEDY_TEMPERATURE = 1e-5


class RequestOutputKind(enum.Enum):
    """What each of a request's outputs holds (vLLM's names)."""

    CUMULATIVE = 0  # everything generated so far, every time
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes, then everything


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    # Log-probabilities of the prompt's tokens (each with this many top alternatives), computed
    # in the prefill; the first prompt token has none (vLLM's prompt_logprobs).
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # The output must follow this JSON schema, regex, choice or grammar.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        try:
            self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            message = "logit_bias must map token ids to numbers"
            raise InvalidParameter("logit_bias", message) from None
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, minimum=1)
            if self.best_of < self.n:
                raise InvalidParameter(
                    "best_of", f"best_of must be >= n, got best_of={self.best_of} and n={self.n}"
                )
        _check_float("temperature", self.temperature, minimum=0.0)
        _check_float("top_p", self.top_p, minimum=0.0, maximum=1.0)
        if self.top_p == 0.0:
            raise InvalidParameter("top_p", "top_p must be in (0, 1], got 0")
        _check_int("top_k", self.top_k, minimum=-1)
        _check_float("min_p", self.min_p, minimum=0.0, maximum=1.0)
        _check_float("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, minimum=0.0)
        if self.repetition_penalty == 0.0:
            raise InvalidParameter("repetition_penalty", "repetition_penalty must be > 0, got 0")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=-(2**63))
        for stop in self.stop:
            if not isinstance(stop, str) or stop == "":
                raise InvalidParameter("stop", f"stop must contain non-empty strings, got {stop!r}")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, minimum=0)
        if self.max_tokens is not None:
            # 0: prefill only (for the prompt's logprobs); nothing is generated.
            _check_int("max_tokens", self.max_tokens, minimum=0)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens",
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise InvalidParameter(
                    "logit_bias", f"logit_bias keys must be token ids >= 0, got {token_id}"
                )
            _check_float("logit_bias", bias, minimum=-100.0, maximum=100.0)
        _check_float("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            raise InvalidParameter(
                "early_stopping",
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}"
            )
        if self.use_beam_search and self.max_tokens == 0:
            raise InvalidParameter("max_tokens", "max_tokens must be >= 1 with use_beam_search")
        if self.use_beam_search and self.temperature > GREEDY_TEMPERATURE and self.temperature != 1.0:
            raise InvalidParameter("temperature", "temperature must be 0 or 1 with use_beam_search")
        if self.structured_outputs is not None and self.use_beam_search:
            # Beams fork and die every step; a grammar state per hypothesis is not kept.
            raise InvalidParameter(
                "structured_outputs", "structured outputs are not supported with use_beam_search"
            )

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine runs for this request (best_of, or n when unset)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidParameter(name, f"{name} must be >= {minimum}, got {value}")


def _check_float(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidParameter(name, f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise InvalidParameter(name, f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidParameter(name, f"{name} must be <= {maximum}, got {value}")
