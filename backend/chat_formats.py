"""Chat formats of families whose checkpoints carry no chat template, or whose format FastChat
does not know: one definition per format, used both ways.

- As a FastChat conversation template (the dict FastChat's workers send from
  /worker_get_conv_template), so FastChat's OpenAI API server builds the right prompts through a
  Pagoda worker (adapters/fastchat/conv_template.py).
- As a Jinja chat template rendering the same prompt, the engine's fallback for a tokenizer
  without one (Dolly v2, OpenAssistant's Pythia models, StableLM-alpha predate chat templates),
  so /v1/chat/completions, `pagoda chat` and LLM.chat work for them too.

The formats mirror fastchat.conversation (0.2.36) where it has them (dolly_v2, oasst_pythia,
stablelm) and the checkpoints' own templates where it does not (Phi-3, Qwen3, StableLM 2,
Gemma). A
format is chosen by the model's names (its path, the names it is served under) and, when known,
its architecture. NOTE: FastChat's ChatML layout writes the system block even for an empty
system message (as its own zephyr template does); the Jinja form does the same, so a model
answers the same prompt through both servers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# fastchat.conversation.SeparatorStyle values (an IntEnum) of the styles used here.
NO_COLON_SINGLE = 4
CHATML = 9
DOLLY = 11


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """A conversation template in FastChat's terms: the prompt is the system prompt
    (system_template with the system message), then per message its role and content in the
    separator style's layout, then the assistant's role to generate."""

    name: str
    sep_style: int
    roles: tuple[str, str]  # user, assistant
    sep: str
    sep2: str | None = None
    system_template: str = "{system_message}"
    system_message: str = ""
    stop_str: str | None = None
    stop_token_ids: tuple[int, ...] | None = None

    def conv_template(self) -> dict[str, Any]:
        """As FastChat's workers serialize a Conversation."""
        return {
            "name": self.name, "system_template": self.system_template,
            "system_message": self.system_message, "roles": list(self.roles), "messages": [],
            "offset": 0, "sep_style": self.sep_style, "sep": self.sep, "sep2": self.sep2,
            "stop_str": self.stop_str,
            "stop_token_ids": None if self.stop_token_ids is None else list(self.stop_token_ids),
        }

    def jinja(self) -> str:
        """A chat template giving the prompt FastChat's API server builds from this template:
        the last system message replaces the default one, user and assistant messages take
        turns, an empty message is rendered as the role alone (as FastChat does)."""
        before, _, after = self.system_template.partition("{system_message}")
        header = "".join((
            "{%- set ns = namespace(system=" + _literal(self.system_message) + ", turn=0) %}",
            "{%- for m in messages if m['role'] == 'system' %}",
            "{%- set ns.system = m['content'] %}{%- endfor %}",
            "{%- set system = " + _literal(before) + " + ns.system + " + _literal(after) + " %}",
            "{%- set roles = {'user': " + _literal(self.roles[0]) + ", 'assistant': "
            + _literal(self.roles[1]) + "} %}",
        ))
        turns = (
            "{%- for m in messages if m['role'] != 'system' %}"
            "{%- if m['role'] not in roles %}"
            "{{ raise_exception('this chat format has no role ' + m['role']) }}{%- endif %}"
            "{%- set role = roles[m['role']] %}" + self._turn() + "{%- endfor %}"
        )
        return header + self._system() + turns + self._generation_prompt()

    def _system(self) -> str:
        if self.sep_style == CHATML:
            return "{%- if system %}{{ system + " + _literal(self.sep + "\n") + " }}{%- endif %}"
        return "{{ system }}"

    def _turn(self) -> str:
        if self.sep_style == CHATML:
            body = "role + '\\n' + m['content'] + " + _literal(self.sep + "\n")
            empty = "role + '\\n'"
        elif self.sep_style == NO_COLON_SINGLE:
            body, empty = "role + m['content'] + " + _literal(self.sep), "role"
        elif self.sep_style == DOLLY:
            # Turns alternate sep and sep2; a reply (odd turn) is followed by a blank line.
            seps = "[" + _literal(self.sep) + ", " + _literal(self.sep2 or "") + "]"
            body = ("role + ':\\n' + m['content'] + " + seps + "[ns.turn % 2]"
                    " + ('\\n\\n' if ns.turn % 2 == 1 else '')")
            empty = "role + ':\\n'"
        else:
            raise ValueError(f"chat format {self.name}: sep_style {self.sep_style} not rendered")
        return ("{%- if m['content'] %}{{ " + body + " }}{%- else %}{{ " + empty
                + " }}{%- endif %}{%- set ns.turn = ns.turn + 1 %}")

    def _generation_prompt(self) -> str:
        suffix = {CHATML: " + '\\n'", DOLLY: " + ':\\n'"}.get(self.sep_style, "")
        return ("{%- if add_generation_prompt %}{{ " + _literal(self.roles[1]) + suffix
                + " }}{%- endif %}")


def _literal(text: str) -> str:
    # A JSON string is a valid Jinja string literal (same quotes and escapes).
    return json.dumps(text)


FORMATS: dict[str, ChatFormat] = {
    "dolly_v2": ChatFormat(
        "dolly_v2", DOLLY, ("### Instruction", "### Response"), sep="\n\n", sep2="### End",
        system_message="Below is an instruction that describes a task. Write a response that "
                       "appropriately completes the request.\n\n",
    ),
    "oasst_pythia": ChatFormat(
        "oasst_pythia", NO_COLON_SINGLE, ("<|prompter|>", "<|assistant|>"), sep="<|endoftext|>",
    ),
    "stablelm": ChatFormat(
        "stablelm", NO_COLON_SINGLE, ("<|USER|>", "<|ASSISTANT|>"), sep="",
        system_template="<|SYSTEM|>{system_message}",
        system_message=(
            "# StableLM Tuned (Alpha version)\n"
            "- StableLM is a helpful and harmless open-source AI language model developed by "
            "StabilityAI.\n"
            "- StableLM is excited to be able to help the user, but will refuse to do anything "
            "that could be considered harmful to the user.\n"
            "- StableLM is more than just an information source, StableLM is also able to write "
            "poetry, short stories, and make jokes.\n"
            "- StableLM will refuse to participate in anything that could harm a human.\n"
        ),
        stop_token_ids=(50278, 50279, 50277, 1, 0),
    ),
    "phi-3": ChatFormat(
        "phi-3", CHATML, ("<|user|>", "<|assistant|>"), sep="<|end|>",
        system_template="<|system|>\n{system_message}", stop_str="<|end|>",
    ),
    # Qwen3's template: ChatML without Qwen2's default system message.
    "qwen3": ChatFormat(
        "qwen3", CHATML, ("<|im_start|>user", "<|im_start|>assistant"), sep="<|im_end|>",
        system_template="<|im_start|>system\n{system_message}", stop_str="<|im_end|>",
        stop_token_ids=(151643, 151645),
    ),
    # StableLM 2 chat models.
    "chatml": ChatFormat(
        "chatml", CHATML, ("<|im_start|>user", "<|im_start|>assistant"), sep="<|im_end|>",
        system_template="<|im_start|>system\n{system_message}", stop_str="<|im_end|>",
    ),
    # Gemma 2 and 3 (and Gemma 1, CodeGemma): "<start_of_turn>user\n...<end_of_turn>\n" turns,
    # the reply opened by "<start_of_turn>model\n"; the tokenizer adds <bos>. FastChat added a
    # Gemma template after 0.2.36, with a separator style 0.2.36 lacks: the turn markup goes
    # into the roles here. Gemma has no system role (its templates fold a system message into
    # the first user turn, which no FastChat layout can): it is written before the first turn.
    "gemma": ChatFormat(
        "gemma", NO_COLON_SINGLE, ("<start_of_turn>user\n", "<start_of_turn>model\n"),
        sep="<end_of_turn>\n", stop_str="<end_of_turn>",
    ),
    # StableLM Zephyr 3B and StableLM 2 Zephyr: Zephyr's layout, GPT-NeoX's end of text.
    "stablelm-zephyr": ChatFormat(
        "stablelm-zephyr", CHATML, ("<|user|>", "<|assistant|>"), sep="<|endoftext|>",
        system_template="<|system|>\n{system_message}", stop_str="<|endoftext|>",
    ),
}


@dataclass(frozen=True, slots=True)
class FormatRule:
    format: str
    architecture: str
    # Substrings of a lower-cased model name; None: every model of the architecture (which must
    # then be known).
    names: tuple[str, ...] | None


# First match wins.
RULES: tuple[FormatRule, ...] = (
    FormatRule("dolly_v2", "GPTNeoXForCausalLM", ("dolly",)),
    FormatRule("oasst_pythia", "GPTNeoXForCausalLM", ("oasst", "openassistant")),
    FormatRule("stablelm", "GPTNeoXForCausalLM", ("stablelm",)),
    FormatRule("stablelm-zephyr", "StableLmForCausalLM", ("zephyr",)),
    FormatRule("chatml", "StableLmForCausalLM", ("chat",)),
    FormatRule("phi-3", "Phi3ForCausalLM", ("phi-3", "phi3", "phi-4-mini")),
    FormatRule("qwen3", "Qwen3ForCausalLM", None),
    FormatRule("qwen3", "Qwen3ForCausalLM", ("qwen3",)),  # a hub id not downloaded yet
    FormatRule("gemma", "Gemma2ForCausalLM", None),
    FormatRule("gemma", "Gemma3ForCausalLM", None),
    FormatRule("gemma", "Gemma2ForCausalLM", ("gemma",)),  # a hub id not downloaded yet
)


def chat_format_for(architectures: Iterable[str], names: Iterable[str]) -> ChatFormat | None:
    """The format of a model with these `architectures` (empty when unknown) served under these
    `names` (paths or hub ids count by their last part and as a whole), or None."""
    known = set(architectures)
    lowered = [name.lower() for name in names if name]
    for rule in RULES:
        if known and rule.architecture not in known:
            continue
        if rule.names is None:
            if known:
                return FORMATS[rule.format]
            continue
        if any(part in name for name in lowered for part in rule.names):
            return FORMATS[rule.format]
    return None


def fallback_chat_template(architectures: list[str], names: list[str]) -> str | None:
    """The Jinja template of the model's format, for a tokenizer that has none (checkpoints
    that predate chat templates: Dolly v2, OpenAssistant's Pythia models, StableLM-alpha)."""
    family = chat_format_for(architectures, names)
    if family is None:
        return None
    logger.info("the tokenizer has no chat template; chat prompts use the %r format",
                family.name)
    return family.jinja()


def local_architectures(model: str | None) -> list[str]:
    """`architectures` of a local checkpoint folder's config.json, read without transformers;
    empty for a hub id (not downloaded yet) or a folder without one."""
    if model is None:
        return []
    config = Path(model).expanduser() / "config.json"
    try:
        return list(json.loads(config.read_text()).get("architectures") or [])
    except (OSError, ValueError):
        return []
