"""Engine logprobs in OpenAI's two shapes: chat's `content[]` and completions' parallel lists.

Token strings are what each token adds to a text, leading space included (" world", not the
"world" a lone `decode` gives for a sentencepiece token); `bytes` are the token's raw bytes, so a
character split across byte tokens can be put back together, as OpenAI's field is meant for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers.decoders import ByteLevel
from transformers import PreTrainedTokenizerBase

from pagoda.adapters.openai.protocol import (
    ChatLogprobs,
    ChatLogprobToken,
    CompletionLogprobs,
    PromptLogprob,
    TopLogprob,
)
from pagoda.backend.outputs import Logprob, PromptLogprobs

# Sentencepiece's byte fallback pieces, e.g. "<0xE2>".
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells byte b as one printable character; this maps it back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return {char: byte for byte, char in chars.items()}


class TokenStrings:
    """Display text and bytes of token ids, cached (a vocabulary is at most a few 100k)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        # A token decoded after this one shows the text it adds, leading space included (a
        # decoder strips the space of the first token only).
        self._anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
        self._anchor_text = self._decode([self._anchor])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_alphabet = _byte_level_alphabet() if isinstance(decoder, ByteLevel) else None
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            text = self._decode([self._anchor, token_id])[len(self._anchor_text):]
            cached = self._cache[token_id] = (text, self._raw_bytes(token_id, text))
        return cached

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _raw_bytes(self, token_id: int, text: str) -> list[int]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if match := _BYTE_PIECE.fullmatch(piece):
                return [int(match.group(1), 16)]
            if self._byte_alphabet is not None and all(c in self._byte_alphabet for c in piece):
                return [self._byte_alphabet[c] for c in piece]
        return list(text.encode("utf-8"))


def _chosen(step: dict[int, Logprob], token_id: int) -> float:
    return step[token_id].logprob


def _top(step: dict[int, Logprob], limit: int) -> list[tuple[int, Logprob]]:
    """The step's top `limit` tokens, best first (the chosen token only if it ranks there)."""
    ranked = [(tid, lp) for tid, lp in step.items() if lp.rank is not None and lp.rank <= limit]
    return sorted(ranked, key=lambda item: item[1].rank or 0)


def chat_logprobs(
    steps: list[dict[int, Logprob]], token_ids: list[int], top_logprobs: int,
    strings: TokenStrings,
) -> ChatLogprobs:
    content = []
    for step, token_id in zip(steps, token_ids, strict=True):
        content.append(ChatLogprobToken(
            token=strings.text(token_id),
            logprob=_chosen(step, token_id),
            bytes=strings.bytes(token_id),
            top_logprobs=[
                TopLogprob(token=strings.text(tid), logprob=lp.logprob, bytes=strings.bytes(tid))
                for tid, lp in _top(step, top_logprobs)
            ],
        ))
    return ChatLogprobs(content=content)


def completion_logprobs(
    steps: Sequence[dict[int, Logprob] | None], token_ids: list[int], first_offset: int,
    strings: TokenStrings, result: CompletionLogprobs | None = None,
) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists; each top_logprobs entry holds the requested top
    tokens plus the chosen one (so up to logprobs + 1), and text_offset counts characters from
    first_offset, where the tokens' text starts in the choice's text. A step of None (the first
    prompt token of an echo) has null logprobs. Appends to `result` when one is given."""
    result = CompletionLogprobs() if result is None else result
    offset = first_offset
    for step, token_id in zip(steps, token_ids, strict=True):
        text = strings.text(token_id)
        result.tokens.append(text)
        if step is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(_chosen(step, token_id))
            result.top_logprobs.append({strings.text(tid): lp.logprob for tid, lp in step.items()})
        result.text_offset.append(offset)
        offset += len(text)
    return result


def prompt_logprobs_json(
    entries: PromptLogprobs, strings: TokenStrings
) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None (the first) or each scored token id's
    logprob, rank and text."""
    return [
        None if entry is None else {
            token_id: PromptLogprob(
                logprob=logprob.logprob, rank=logprob.rank, decoded_token=strings.text(token_id)
            )
            for token_id, logprob in entry.items()
        }
        for entry in entries
    ]
