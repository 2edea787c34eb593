"""Structured outputs: the output constrained by a JSON schema, regex, choice or grammar.

A spec (`StructuredOutputsParams`, in SamplingParams.structured_outputs) is compiled once per
distinct spec (`StructuredOutputs.compile`, an LRU over a backend: xgrammar or llguidance); each
sequence walks it with its own `GrammarMatcher`. Every step, build_model_input fills the bitmask
rows of the constrained sequences, the sampler masks their logits with them, and the stop
checker advances each matcher by the accepted token, finishing the sequence once its grammar is
terminated.
"""

from pagoda.backend.structured.bitmask import apply_token_bitmask, fill_bitmasks
from pagoda.backend.structured.grammar import CompiledGrammar, GrammarBackend, GrammarMatcher
from pagoda.backend.structured.manager import BACKENDS, DEFAULT_BACKEND, StructuredOutputs
from pagoda.backend.structured.params import StructuredOutputsParams

__all__ = [
    "BACKENDS", "DEFAULT_BACKEND", "CompiledGrammar", "GrammarBackend", "GrammarMatcher",
    "StructuredOutputs", "StructuredOutputsParams", "apply_token_bitmask", "fill_bitmasks",
]
