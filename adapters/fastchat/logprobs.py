"""Log-probabilities in the shape FastChat's workers send them (OpenAI's legacy `logprobs`).

FastChat's peers read {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, all covering
the whole text of the chunk (the prompt too when it is echoed) and growing with it.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from pagoda.backend.outputs import CompletionOutput

# Tokens of context decoded before a token to get its text: enough for sentencepiece's leading
# spaces and for multi-byte characters split over byte-fallback tokens.
CONTEXT_TOKENS = 6


class LogprobsFormatter:
    """Builds one request's `logprobs` object chunk after chunk; token texts already made are
    kept, so a stream costs a few short decodes per new token."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], prompt: str,
        echo: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.echo = echo
        self.text_start = len(prompt) if echo else 0
        self._token_texts: list[str] = []  # generated tokens seen so far
        self._top: list[dict[str, float]] = []
        self._prompt_token_texts: list[str] | None = None

    def format(self, completion: CompletionOutput) -> dict[str, Any]:
        steps = completion.logprobs or []
        token_ids = completion.token_ids[: len(steps)]
        all_ids = self.prompt_token_ids + token_ids
        num_prompt = len(self.prompt_token_ids)
        for index in range(len(self._token_texts), len(token_ids)):
            context = all_ids[max(0, num_prompt + index - CONTEXT_TOKENS) : num_prompt + index]
            self._token_texts.append(self._text_after(context, token_ids[index]))
            self._top.append({
                self._text_after(context, top_id): entry.logprob
                for top_id, entry in steps[index].items()
            })
        tokens = self._token_texts[: len(token_ids)]
        token_logprobs: list[float | None] = [
            steps[i][token_id].logprob for i, token_id in enumerate(token_ids)
        ]
        top_logprobs: list[dict[str, float] | None] = list(self._top[: len(token_ids)])
        offsets = _offsets(tokens, self.text_start)
        if self.echo:
            # The engine computes no prompt logprobs: echoed prompt tokens carry None, as the
            # first token does in FastChat's own worker.
            prompt_tokens = self._prompt_texts()
            tokens = prompt_tokens + tokens
            token_logprobs = [None] * num_prompt + token_logprobs
            top_logprobs = [None] * num_prompt + top_logprobs
            offsets = _offsets(prompt_tokens, 0) + offsets
        return {
            "text_offset": offsets,
            "tokens": list(tokens),
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
        }

    def _prompt_texts(self) -> list[str]:
        if self._prompt_token_texts is None:
            ids = self.prompt_token_ids
            self._prompt_token_texts = [
                self._text_after(ids[max(0, i - CONTEXT_TOKENS) : i], ids[i])
                for i in range(len(ids))
            ]
        return self._prompt_token_texts

    def _text_after(self, context: list[int], token_id: int) -> str:
        """The text `token_id` adds after `context` (a few tokens of it, to stay cheap)."""
        before = self.tokenizer.decode(context, skip_special_tokens=True)
        after = self.tokenizer.decode([*context, token_id], skip_special_tokens=True)
        return after[len(before) :] if after.startswith(before) else after


def _offsets(texts: list[str], start: int) -> list[int]:
    offsets = []
    position = start
    for text in texts:
        offsets.append(position)
        position += len(text)
    return offsets
