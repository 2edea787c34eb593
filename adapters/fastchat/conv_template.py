"""The conversation template a worker hands to FastChat's API server (/worker_get_conv_template).

FastChat's API server builds chat prompts from this template, so it must match the model's own
chat format. The families Pagoda knows the format of (backend/chat_formats.py: Dolly v2,
OpenAssistant Pythia, StableLM-alpha and StableLM 2, Phi-3, Qwen3) get theirs, by the model's
architecture and names; otherwise, with fschat installed, its registry is used, exactly as
FastChat's workers do; without it only the built-in Vicuna v1.1 template (the demo model's chat
format) is known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Any

from pagoda.backend.chat_formats import chat_format_for, local_architectures

logger = logging.getLogger(__name__)

VICUNA_TEMPLATE_NAME = "vicuna_v1.1"
# FastChat's fallback for a model it does not recognise (its BaseModelAdapter's template).
FASTCHAT_FALLBACK_TEMPLATE_NAME = "one_shot"
# FastChat templates its name matching picks for architectures they do not belong to: any
# "stablelm" name gets StableLM-alpha's (GPT-NeoX) format, not StableLM 2's.
FASTCHAT_MISMATCHES: dict[str, set[str]] = {"StableLmForCausalLM": {"stablelm"}}

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


def resolve_conv_template(
    template_name: str | None,
    model: str | None,
    model_names: list[str],
    architectures: list[str] | None = None,
) -> dict[str, Any]:
    """The template for the served model: `template_name` when given (--conv-template); else,
    for the demo model (`model` None), Vicuna v1.1; else the family's format Pagoda knows
    (by `architectures`, read from a local checkpoint's config.json when not given, and the
    names); else FastChat's choice for the model path, then for each served name (FastChat
    matches on names such as "vicuna-7b" or "mistral")."""
    if architectures is None:
        architectures = local_architectures(model)
    family = None if template_name or model is None else chat_format_for(
        architectures, [model, *model_names]
    )
    try:
        from fastchat.conversation import conv_templates, get_conv_template
        from fastchat.model.model_adapter import get_conversation_template
    except ImportError:
        if family is not None:
            return family.conv_template()
        return _builtin_template(template_name, model)
    if family is not None:
        logger.info("conversation template for %s: %r", model, family.name)
        # FastChat's own object where it has the format (chat_formats.py mirrors it).
        if family.name in conv_templates:
            return _as_dict(get_conv_template(family.name))
        return family.conv_template()
    if template_name:
        if template_name not in conv_templates:
            raise ValueError(
                f"--conv-template {template_name!r} is not one of FastChat's templates "
                f"({', '.join(sorted(conv_templates))})"
            )
        return _as_dict(get_conv_template(template_name))
    if model is None:
        return _as_dict(get_conv_template(VICUNA_TEMPLATE_NAME))
    for candidate in (model, *model_names):
        # NOTE: FastChat's adapters match names by substring and some print() a warning when
        # they do ("emptymodel" contains "mpt": "Loading base MPT model..."); the choice is
        # logged here instead, in words about this worker.
        with contextlib.redirect_stdout(io.StringIO()):
            conv = get_conversation_template(candidate)
        if any(conv.name in FASTCHAT_MISMATCHES.get(name, ()) for name in architectures):
            continue
        if conv.name != FASTCHAT_FALLBACK_TEMPLATE_NAME:
            logger.info("FastChat conversation template for %s: %r", candidate, conv.name)
            return _as_dict(conv)
    logger.warning(
        "FastChat knows no conversation template for %s (names %s); using %r. Pass "
        "--conv-template to choose one.", model, model_names, FASTCHAT_FALLBACK_TEMPLATE_NAME,
    )
    return _as_dict(get_conv_template(FASTCHAT_FALLBACK_TEMPLATE_NAME))


def _builtin_template(template_name: str | None, model: str | None) -> dict[str, Any]:
    if template_name not in (None, VICUNA_TEMPLATE_NAME):
        raise ValueError(
            f"--conv-template {template_name!r} needs fschat installed (pip install "
            "'pagoda[fastchat]'); without it only 'vicuna_v1.1' is available"
        )
    if template_name is None and model is not None:
        logger.warning(
            "fschat is not installed: serving FastChat's %r conversation template for %s; install "
            "'pagoda[fastchat]' or pass --conv-template if the model uses another chat format",
            VICUNA_TEMPLATE_NAME, model,
        )
    return dict(VICUNA_V1_1)


def _as_dict(conv: Any) -> dict[str, Any]:
    """A fastchat Conversation as FastChat's workers serialise it (sep_style as an int)."""
    data = dataclasses.asdict(conv)
    data["sep_style"] = int(conv.sep_style)
    data["roles"] = list(conv.roles)
    return data
