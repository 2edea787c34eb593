"""Sequences whose KV depends on their length, not only on their tokens: LongRoPE as
transformers runs it (Phi-3 128k, Phi-3.5, Phi-4-mini).

Such a model rotates every token of a sequence longer than its threshold T with other
frequencies than the tokens of a shorter one, and transformers' Phi-3 drops its cache and
recomputes the whole sequence the first time the sequence grows past T. To match it token for
token the engine:

- tells the model, for every token it feeds, whether that token's sequence is long
  (`ModelInput.long_context`): a prompt longer than T is long from its first chunk on;
- recomputes a sequence that was computed short once it grows past T (the scheduler sends its
  group back to the queue, as after a preemption);
- keeps the prefix cache's blocks of long and short sequences apart (their chains start from
  different roots), since the same tokens have different keys in the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LongContext:
    threshold: int  # a sequence of more tokens than this is long

    def is_long(self, num_tokens: int) -> bool:
        return num_tokens > self.threshold


def long_context_of(model: Any, max_model_len: int) -> LongContext | None:
    """The model's LongContext, or None when it has no `long_context_threshold` (the optional
    part of the CausalLM protocol) or no sequence can grow past it."""
    threshold = getattr(model, "long_context_threshold", None)
    if threshold is None or max_model_len <= threshold:
        return None
    return LongContext(threshold)
