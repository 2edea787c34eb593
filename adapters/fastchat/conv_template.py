"""The conversation template a worker hands to FastChat's API server (/worker_get_conv_template).

FastChat's API server builds chat prompts from this template, so it must match the model's own
chat format. With fschat installed its registry is used, exactly as FastChat's workers do;
without it only the built-in Vicuna v1.1 template (the demo model's chat format) is known. Gemma's
template, which FastChat added after its last PyPI release (0.2.36), is built in for both: served
for a model whose path or name says "gemma" when FastChat has nothing better.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Any

logger = logging.getLogger(__name__)

VICUNA_TEMPLATE_NAME = "vicuna_v1.1"
GEMMA_TEMPLATE_NAME = "gemma"
# FastChat's fallback for a model it does not recognise (its BaseModelAdapter's template).
FASTCHAT_FALLBACK_TEMPLATE_NAME = "one_shot"

# fastchat.conversation's "vicuna_v1.1" as the worker protocol serialises it; sep_style 2 is
# SeparatorStyle.ADD_COLON_TWO. The demo model's chat_template.jinja renders the same prompt.
VICUNA_V1_1: dict[str, Any] = {
    "name": VICUNA_TEMPLATE_NAME,
    "system_template": "{system_message}",
    "system_message": (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    "roles": ["USER", "ASSISTANT"],
    "messages": [],
    "offset": 0,
    "sep_style": 2,
    "sep": " ",
    "sep2": "</s>",
    "stop_str": None,
    "stop_token_ids": None,
}

# FastChat's later "gemma" template in fschat 0.2.36's terms: its GEMMA separator style does not
# exist there, so the turn markup goes into the roles of sep_style 4 (NO_COLON_SINGLE, which
# writes role + message + sep per turn, and the bare role to open the reply):
# "<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n", as Gemma's own chat
# template renders it (the tokenizer adds <bos>). Gemma has no system role: a system message is
# written as plain text before the first turn.
GEMMA: dict[str, Any] = {
    "name": GEMMA_TEMPLATE_NAME,
    "system_template": "{system_message}",
    "system_message": "",
    "roles": ["<start_of_turn>user\n", "<start_of_turn>model\n"],
    "messages": [],
    "offset": 0,
    "sep_style": 4,
    "sep": "<end_of_turn>\n",
    "sep2": None,
    "stop_str": "<end_of_turn>",
    "stop_token_ids": None,
}
BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    VICUNA_TEMPLATE_NAME: VICUNA_V1_1,
    GEMMA_TEMPLATE_NAME: GEMMA,
}


def resolve_conv_template(
    template_name: str | None, model: str | None, model_names: list[str]
) -> dict[str, Any]:
    """The template for the served model: `template_name` when given (--conv-template); else,
    for the demo model (`model` None), Vicuna v1.1; else FastChat's choice for the model path,
    then for each served name (FastChat matches on names such as "vicuna-7b" or "mistral"); a
    Gemma model FastChat does not know gets the built-in Gemma template."""
    try:
        from fastchat.conversation import conv_templates, get_conv_template
        from fastchat.model.model_adapter import get_conversation_template
    except ImportError:
        return _builtin_template(template_name, model, model_names)
    if template_name:
        if template_name in conv_templates:
            return _as_dict(get_conv_template(template_name))
        if template_name in BUILTIN_TEMPLATES:
            return dict(BUILTIN_TEMPLATES[template_name])
        known = sorted({*conv_templates, *BUILTIN_TEMPLATES})
        raise ValueError(
            f"--conv-template {template_name!r} is not one of FastChat's templates "
            f"({', '.join(known)})"
        )
    if model is None:
        return _as_dict(get_conv_template(VICUNA_TEMPLATE_NAME))
    for candidate in (model, *model_names):
        # NOTE: FastChat's adapters match names by substring and some print() a warning when
        # they do ("emptymodel" contains "mpt": "Loading base MPT model..."); the choice is
        # logged here instead, in words about this worker.
        with contextlib.redirect_stdout(io.StringIO()):
            conv = get_conversation_template(candidate)
        if conv.name != FASTCHAT_FALLBACK_TEMPLATE_NAME:
            logger.info("FastChat conversation template for %s: %r", candidate, conv.name)
            return _as_dict(conv)
    gemma = _gemma_for(model, model_names)
    if gemma is not None:
        return gemma
    logger.warning(
        "FastChat knows no conversation template for %s (names %s); using %r. Pass "
        "--conv-template to choose one.", model, model_names, FASTCHAT_FALLBACK_TEMPLATE_NAME,
    )
    return _as_dict(get_conversation_template(model))


def _builtin_template(
    template_name: str | None, model: str | None, model_names: list[str]
) -> dict[str, Any]:
    if template_name is not None:
        if template_name not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"--conv-template {template_name!r} needs fschat installed (pip install "
                f"'pagoda[fastchat]'); without it only {sorted(BUILTIN_TEMPLATES)} are available"
            )
        return dict(BUILTIN_TEMPLATES[template_name])
    if model is None:
        return dict(VICUNA_V1_1)
    gemma = _gemma_for(model, model_names)
    if gemma is not None:
        return gemma
    logger.warning(
        "fschat is not installed: serving FastChat's %r conversation template for %s; install "
        "'pagoda[fastchat]' or pass --conv-template if the model uses another chat format",
        VICUNA_TEMPLATE_NAME, model,
    )
    return dict(VICUNA_V1_1)


def _gemma_for(model: str, model_names: list[str]) -> dict[str, Any] | None:
    """The built-in Gemma template when the model's path or a served name says "gemma"."""
    for candidate in (model, *model_names):
        if "gemma" in candidate.lower():
            logger.info("built-in Gemma conversation template for %s", candidate)
            return dict(GEMMA)
    return None


def _as_dict(conv: Any) -> dict[str, Any]:
    """A fastchat Conversation as FastChat's workers serialise it (sep_style as an int)."""
    data = dataclasses.asdict(conv)
    data["sep_style"] = int(conv.sep_style)
    data["roles"] = list(conv.roles)
    return data
