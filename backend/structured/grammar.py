"""The contract every grammar engine (xgrammar, llguidance) fulfils for the engine.

A backend compiles a StructuredOutputsParams once into a CompiledGrammar (immutable, shared by
every request with the same spec); each sequence then walks it with its own GrammarMatcher.
Bitmasks are int32 rows of ceil(vocab_size / 32) words: bit t % 32 of word t // 32 is set when
token t is allowed (the layout both xgrammar and llguidance use).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pagoda.backend.structured.params import StructuredOutputsParams


class GrammarMatcher(ABC):
    """One sequence's position in a grammar."""

    vocab_size: int  # the model's: the number of tokens its bitmask rows cover
    # A bitmask row ANDed into every row this matcher fills (tokens its backend must forbid
    # whatever the grammar says), or None. Applied by fill_bitmasks, batched.
    token_filter: torch.Tensor | None = None

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and no change) when the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of the CPU int32 `bitmask`. Once the
        grammar is complete only the stop tokens are allowed."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""


class CompiledGrammar(ABC):
    @abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A new matcher at the start of the grammar."""


class GrammarBackend(ABC):
    """Compiles specs for one tokenizer. Thread-safe: requests are compiled on the callers'
    threads while the engine thread steps."""

    name: str

    @abstractmethod
    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled spec; InvalidParameter("structured_outputs") when the backend cannot
        compile it (an invalid schema, regex or grammar)."""
