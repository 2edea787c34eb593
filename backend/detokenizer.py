"""Incremental detokenization and stop strings for one generated sequence.

Decoding a token on its own loses context: a sentencepiece tokenizer drops the leading space ("▁")
of the first token it decodes, and a byte-fallback token holds one byte of a character that may span
up to four tokens. So each step decodes a short window of token ids ending at the new token and
emits only what it adds to the decode of the window's older part (vLLM's prefix offset / read
offset technique); the cost per token is bounded by the window, not by the sequence length.
"""

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from pagoda.backend.errors import InvalidParameter

# Prompt tokens that seed the window, so the first generated token decodes as it would inside the
# whole text (its leading space kept, byte-level merges resolved).
_PROMPT_WINDOW_TOKENS = 5

# A UTF-8 character is at most 4 bytes and every token carries at least one byte, so an incomplete
# character spans at most 3 tokens. Past that, a trailing U+FFFD stands for invalid bytes that no
# later token can complete, and holding tokens back any longer would only grow the window.
_MAX_HELD_TOKENS = 3

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text, one token at a time.

    The text is what the output adds to the prompt's text as `tokenizer.decode` gives it: for
    valid UTF-8 output the final text equals `decode(prompt + output)[len(decode(prompt)):]`,
    decoding with the given skip_special_tokens and spaces_between_special_tokens (transformers 5
    tokenizers for text ignore the latter) and clean_up_tokenization_spaces=False (cleanup rewrites
    text that may already have been streamed). Invalid UTF-8 streams as U+FFFD, and a full decode
    may then differ.

    Stop strings are matched in the generated text only, never across the prompt boundary. When
    several complete in one step, the one that ends first wins (as if the text arrived one character
    at a time), and of those ending at the same place, the longest; so the returned text never
    contains a stop string (unless include_stop_str_in_output keeps the matched one).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if any(not stop_str for stop_str in stop):
            message = f"stop: stop strings must be non-empty, got {list(stop)!r}"
            raise InvalidParameter("stop", message)
        self._tokenizer = tokenizer
        # A tokenizer backed by the Rust `tokenizers` library decodes through it directly:
        # transformers' decode adds nothing for it with clean-up off (spaces between special
        # tokens are the backend's own), and its wrapper costs more than the decode itself,
        # twice per generated token.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._stop = tuple(stop)
        self._include_stop_str_in_output = include_stop_str_in_output
        # NOTE: skipped special tokens are dropped before they enter the window: decode would drop
        # them anyway, and held in the window they would only make it longer.
        self._skipped_ids = frozenset(tokenizer.all_special_ids if skip_special_tokens else ())
        prompt_ids = [
            token_id for token_id in prompt_token_ids if token_id not in self._skipped_ids
        ]
        # The window holds ids from the prefix offset on; ids before `_read_offset` are already
        # turned into text, ids after it are held back (their text is not emitted yet).
        self._window_ids: list[int] = prompt_ids[-_PROMPT_WINDOW_TOKENS:]
        self._read_offset = len(self._window_ids)
        self._text = ""
        # Length of the trailing part of `_text` that could still grow into a stop string.
        self._num_held_chars = 0
        self._stop_reason: str | None = None

    def add_token(self, token_id: int) -> str | None:
        """Append one generated token.

        Returns the stop string it completed (the text is then cut: at the stop string's start, or
        after its end with include_stop_str_in_output), else None. Must not be called again after a
        stop string matched.
        """
        if self._stop_reason is not None:
            raise RuntimeError(f"add_token after stop string {self._stop_reason!r} matched")
        if token_id in self._skipped_ids:
            return None
        self._window_ids.append(token_id)
        prefix_text = self._decode(self._window_ids[: self._read_offset])
        window_text = self._decode(self._window_ids)
        # Wait while the window ends in an incomplete character, or adds nothing yet (a token whose
        # text shows only once the next one arrives); see _MAX_HELD_TOKENS for why not forever.
        incomplete = window_text.endswith(_REPLACEMENT_CHAR) or len(window_text) <= len(prefix_text)
        if incomplete and len(self._window_ids) - self._read_offset <= _MAX_HELD_TOKENS:
            return None
        return self._emit(window_text[len(prefix_text) :])

    def output_text(self, finished: bool, start: int = 0) -> str:
        """The text so far.

        While not finished, it never ends in an incomplete UTF-8 character and holds back a trailing
        part that could still become a stop string (the longest suffix that is a proper prefix of
        some stop string), so every streamed value is a prefix of the next and of the final text.
        finished=True releases held-back text (the sequence ended for another reason). `start`
        skips the first characters (those a reader already has), so a delta costs its own size.
        """
        if not finished:
            return self._text[start : len(self._text) - self._num_held_chars]
        if self._stop_reason is None and len(self._window_ids) > self._read_offset:
            # The held tokens end in bytes that will never be completed: emit them, as U+FFFD.
            prefix_text = self._decode(self._window_ids[: self._read_offset])
            self._emit(self._decode(self._window_ids)[len(prefix_text) :])
        return self._text[start:]

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            token_ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _emit(self, new_text: str) -> str | None:
        """Appends the text of the held tokens, which then become the window's prefix; returns the
        stop string the new text completed, if any."""
        del self._window_ids[: self._read_offset]
        self._read_offset = len(self._window_ids)
        num_old_chars = len(self._text)
        self._text += new_text
        if not new_text or not self._stop:
            return None
        match = self._find_stop(num_old_chars)
        if match is not None:
            stop_str, start = match
            end = start + len(stop_str) if self._include_stop_str_in_output else start
            self._text = self._text[:end]
            self._num_held_chars = 0
            self._stop_reason = stop_str
            return stop_str
        self._num_held_chars = self._longest_stop_prefix_suffix()
        return None

    def _find_stop(self, num_old_chars: int) -> tuple[str, int] | None:
        """The stop string that ends first in the text, with its start; only occurrences that end
        in the new text are searched for, since earlier ones would have matched before."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop string), smallest wins
        for stop_str in self._stop:
            start = self._text.find(stop_str, max(0, num_old_chars - len(stop_str) + 1))
            if start < 0:
                continue
            candidate = (start + len(stop_str), -len(stop_str), stop_str)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return None
        end, _, stop_str = best
        return stop_str, end - len(stop_str)

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop_str in self._stop:
            for length in range(min(len(stop_str) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop_str[:length]):
                    longest = length
                    break
        return longest
