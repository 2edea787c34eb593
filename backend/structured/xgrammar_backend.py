"""Structured outputs on xgrammar: grammars compiled against the tokenizer's vocabulary, and a
GrammarMatcher per sequence that fills its bitmask row in C++.

NOTE: xgrammar 0.2's rule for strings with a maxLength lets raw control characters through (its
plain string rule does not), which no JSON parser accepts. Compact JSON never holds a raw
character below 0x20 anywhere, so JSON grammars also mask every token that decodes to one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from pagoda.backend.errors import InvalidParameter
from pagoda.backend.structured.bitmask import BITS_PER_WORD, bitmask_words
from pagoda.backend.structured.choice import choice_grammar
from pagoda.backend.structured.grammar import CompiledGrammar, GrammarBackend, GrammarMatcher
from pagoda.backend.structured.params import FIELD, StructuredOutputsParams


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, compiled: xgrammar.CompiledGrammar, allowed: torch.Tensor | None) -> None:
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.token_filter = allowed
        self._matcher = xgrammar.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XGrammarCompiled(CompiledGrammar):
    def __init__(self, compiled: xgrammar.CompiledGrammar, allowed: torch.Tensor | None) -> None:
        self._compiled = compiled
        self._allowed = allowed

    def matcher(self) -> GrammarMatcher:
        return XGrammarMatcher(self._compiled, self._allowed)


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
        self._json_tokens = _tokens_without_control_bytes(info)

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        is_json = spec.json is not None or spec.json_object
        try:
            return XGrammarCompiled(self._compile(spec), self._json_tokens if is_json else None)
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


def _tokens_without_control_bytes(info: xgrammar.TokenizerInfo) -> torch.Tensor:
    """A bitmask row allowing every token whose text has no byte below 0x20 (special tokens,
    EOS among them, stay allowed: the grammar decides about those)."""
    allowed = torch.ones(bitmask_words(info.vocab_size) * BITS_PER_WORD, dtype=torch.bool)
    special = set(info.special_token_ids)
    for token_id, text in enumerate(info.decoded_vocab):
        if token_id not in special and any(byte < 0x20 for byte in text):
            allowed[token_id] = False
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int64)
    words = (allowed.view(-1, BITS_PER_WORD).to(torch.int64) << shifts).sum(dim=1)
    # NOTE: words above 2**31 - 1 wrap to the negative int32 with the same bits.
    return words.to(torch.int32)
