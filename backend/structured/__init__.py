"""Structured outputs: the output constrained by a JSON schema, regex, choice or grammar.

A spec (`StructuredOutputsParams`, in SamplingParams.structured_outputs) is compiled once per
distinct spec (`StructuredOutputs.compile`, an LRU over a backend: xgrammar or llguidance); each
sequence walks it with its own `GrammarMatcher`. Every step, build_model_input fills the bitmask
rows of the constrained sequences, the sampler masks their logits with them, and the stop
checker advances each matcher by the accepted token, finishing the sequence once its grammar is
terminated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagoda.backend.lazy import lazy_attributes

if TYPE_CHECKING:
    from pagoda.backend.structured.bitmask import apply_token_bitmask, fill_bitmasks
    from pagoda.backend.structured.grammar import (
        CompiledGrammar,
        GrammarBackend,
        GrammarMatcher,
    )
    from pagoda.backend.structured.manager import StructuredOutputs
    from pagoda.backend.structured.params import (
        BACKENDS,
        DEFAULT_BACKEND,
        StructuredOutputsParams,
    )

# NOTE: lazy, so the CLI reads the backend names (params) without importing torch or a grammar
# engine.
__getattr__ = lazy_attributes(__name__, {
    "BACKENDS": "pagoda.backend.structured.params",
    "DEFAULT_BACKEND": "pagoda.backend.structured.params",
    "CompiledGrammar": "pagoda.backend.structured.grammar",
    "GrammarBackend": "pagoda.backend.structured.grammar",
    "GrammarMatcher": "pagoda.backend.structured.grammar",
    "StructuredOutputs": "pagoda.backend.structured.manager",
    "StructuredOutputsParams": "pagoda.backend.structured.params",
    "apply_token_bitmask": "pagoda.backend.structured.bitmask",
    "fill_bitmasks": "pagoda.backend.structured.bitmask",
})

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "CompiledGrammar", "GrammarBackend", "GrammarMatcher",
    "StructuredOutputs", "StructuredOutputsParams", "apply_token_bitmask", "fill_bitmasks",
]
