"""Structured outputs on llguidance: grammars (Lark, or JSON schemas and regexes turned into its
own format) checked against the tokenizer once; each sequence parses lazily with its own
LLMatcher."""

from __future__ import annotations

from collections.abc import Iterable

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from pagoda.backend.errors import InvalidParameter
from pagoda.backend.structured.choice import choice_lark
from pagoda.backend.structured.grammar import CompiledGrammar, GrammarBackend, GrammarMatcher
from pagoda.backend.structured.params import FIELD, StructuredOutputsParams

# Compact JSON, as with xgrammar: a weak model could otherwise emit whitespace forever.
_JSON_OPTIONS = {"whitespace_flexible": False}


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str,
                 stop_token_ids: frozenset[int]) -> None:
        self.vocab_size = tokenizer.vocab_size
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self._stop_token_ids = stop_token_ids
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        if token_id in self._stop_token_ids:
            # Allowed once the grammar is complete, and then it ends the sequence.
            matcher = self._matcher
            self._terminated = matcher.is_accepting() and matcher.consume_token(token_id)
            return self._terminated
        # NOTE: consume_token would put the matcher in an error state for good on a refused
        # token; try_consume_tokens refuses it and leaves the matcher as it was.
        return self._matcher.try_consume_tokens([token_id]) == 1

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def is_terminated(self) -> bool:
        return self._terminated


class LLGuidanceCompiled(CompiledGrammar):
    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str,
                 stop_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._grammar = grammar
        self._stop_token_ids = stop_token_ids

    def matcher(self) -> GrammarMatcher:
        return LLGuidanceMatcher(self._tokenizer, self._grammar, self._stop_token_ids)


class LLGuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int]
    ) -> None:
        self._stop_token_ids = frozenset(stop_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=sorted(self._stop_token_ids)[0]
        )

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            grammar = _grammar(spec)
        except ValueError as error:
            raise InvalidParameter(FIELD, f"invalid {spec.kind}: {error}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if problem:
            raise InvalidParameter(
                FIELD, f"cannot compile the {spec.kind} for structured outputs: {problem}"
            )
        return LLGuidanceCompiled(self._tokenizer, grammar, self._stop_token_ids)


def _grammar(spec: StructuredOutputsParams) -> str:
    if spec.json is not None:
        return llguidance.LLMatcher.grammar_from_json_schema(spec.json, overrides=_JSON_OPTIONS)
    if spec.json_object:
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=_JSON_OPTIONS
        )
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark(choice_lark(spec.choice))
    assert spec.grammar is not None
    # GBNF (`root ::= ...`), as vLLM's guided_grammar examples are written, or Lark.
    lark = llguidance.gbnf_to_lark(spec.grammar) if "::=" in spec.grammar else spec.grammar
    return llguidance.LLMatcher.grammar_from_lark(lark)
