"""Prompt text to token ids, by the one rule every path that counts or runs a prompt follows."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The token ids the engine runs for `text`: with the tokenizer's special tokens (BOS),
    unless the text already starts with the BOS token, as most chat templates render it, which
    must not get a second one."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)
