"""Structured outputs on xgrammar: grammars compiled against the tokenizer's vocabulary, and a
GrammarMatcher per sequence that fills its bitmask row in C++."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from pagoda.backend.errors import InvalidParameter
from pagoda.backend.structured.choice import choice_grammar
from pagoda.backend.structured.grammar import CompiledGrammar, GrammarBackend, GrammarMatcher
from pagoda.backend.structured.params import FIELD, StructuredOutputsParams


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self.vocab_size = compiled.tokenizer_info.vocab_size
        # NOTE: no rollback history: a recomputed sequence keeps its tokens, so its matcher
        # never has to step back.
        self._matcher = xgrammar.GrammarMatcher(compiled, max_rollback_tokens=0)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XGrammarCompiled(CompiledGrammar):
    def __init__(self, compiled: xgrammar.CompiledGrammar) -> None:
        self._compiled = compiled

    def matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(self._compiled)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int]
    ) -> None:
        # vocab_size is the model's (its logits' width), which may exceed the tokenizer's:
        # the ids past the tokenizer's are never allowed.
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        # NOTE: xgrammar's own cache is off: StructuredOutputs keeps an LRU of compiled grammars.
        self._compiler = xgrammar.GrammarCompiler(
            info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
        )

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            return XGrammarCompiled(self._compile(spec))
        except (RuntimeError, ValueError, TypeError) as error:
            raise InvalidParameter(
                FIELD, f"cannot compile the {spec.kind} for structured outputs: {error}"
            ) from None

    def _compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        # Compact JSON: with any whitespace allowed, a weak model can emit spaces forever.
        if spec.json is not None:
            return self._compiler.compile_json_schema(spec.json, any_whitespace=False)
        if spec.json_object:
            return self._compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
        if spec.regex is not None:
            return self._compiler.compile_regex(spec.regex)
        if spec.choice is not None:
            return self._compiler.compile_grammar(choice_grammar(spec.choice, "root"))
        assert spec.grammar is not None
        return self._compiler.compile_grammar(spec.grammar)
