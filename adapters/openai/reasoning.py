"""Reasoning parsers (`--reasoning-parser`): the model's thinking, written between <think> and
</think>, goes to `reasoning_content` (streamed as its own deltas) and the rest to `content`.

Like the tool parsers, each splits the output so far; while it is unfinished, a tail that could
begin a tag is held back, so a stream never shows half a tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pagoda.adapters.openai.tools.parsers import held_back

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningParser(ABC):
    name: str

    @abstractmethod
    def split(self, text: str, finished: bool) -> tuple[str | None, str]:
        """(reasoning, content) of the output so far; reasoning None when there is none."""


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek R1: its template opens <think> in the prompt, so the output starts in its
    thinking (an explicit <think> is skipped) and everything before </think> is reasoning; an
    output that never closes it is all reasoning."""

    name = "deepseek_r1"

    def split(self, text: str, finished: bool) -> tuple[str | None, str]:
        body = _after_start(text)
        end = body.find(THINK_END)
        if end >= 0:
            return body[:end], body[end + len(THINK_END):]
        if not finished:
            body = body[:len(body) - held_back(body, THINK_END)]
        return body, ""


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen 3: thinking in <think>...</think> at the start of the output when thinking is on,
    none at all when it is off (then everything is content)."""

    name = "qwen3"

    def split(self, text: str, finished: bool) -> tuple[str | None, str]:
        end = text.find(THINK_END)
        if end >= 0:
            return _after_start(text[:end]), text[end + len(THINK_END):]
        stripped = text.lstrip()
        if stripped.startswith(THINK_START):
            body = _after_start(text)
            if not finished:
                body = body[:len(body) - held_back(body, THINK_END)]
            return body, ""
        if not finished and THINK_START.startswith(stripped):
            return None, ""  # nothing yet, or the tag's beginning
        return None, text


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def _after_start(text: str) -> str:
    stripped = text.lstrip()
    return stripped[len(THINK_START):] if stripped.startswith(THINK_START) else text
