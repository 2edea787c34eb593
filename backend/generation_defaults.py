"""A checkpoint's recommended sampling settings, read from its generation_config.json as vLLM's
`--generation-config auto` (its default) reads them.

The file's settings among temperature, top_p, top_k, min_p and repetition_penalty become the
defaults of requests that leave them unset (Qwen3 asks for temperature 0.6, top_p 0.95, top_k
20); `max_new_tokens` caps every request's max_tokens.
`do_sample` is ignored, as vLLM ignores it: a request that wants greedy asks for temperature 0.
"vllm" uses none of it (the API's own defaults); a folder reads that folder's file instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # generation_config's max_new_tokens: a cap, see cap_max_tokens

    def sampling_values(self) -> dict[str, Any]:
        """The sampling fields that have a default (max_tokens aside)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "max_tokens" and getattr(self, f.name) is not None}

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` (SamplingParams keywords) with each unset (None or absent) sampling field
        given its default."""
        filled = dict(values)
        for name, default in self.sampling_values().items():
            if filled.get(name) is None:
                filled[name] = default
        return filled

    def cap_max_tokens(self, max_tokens: int | None) -> int | None:
        """vLLM's rule: the smaller of the request's max_tokens and max_new_tokens (either may
        be unset)."""
        if self.max_tokens is None:
            return max_tokens
        return self.max_tokens if max_tokens is None else min(max_tokens, self.max_tokens)


# No defaults: the API's and SamplingParams' own apply.
NO_SAMPLING_DEFAULTS = SamplingDefaults()


def load_sampling_defaults(source: str, model_path: Path) -> SamplingDefaults:
    """The defaults `source` names: "auto" (the model's folder), "vllm" (none) or a folder
    holding a generation_config.json."""
    if source == "vllm":
        return NO_SAMPLING_DEFAULTS
    folder = model_path if source == "auto" else Path(source).expanduser()
    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        if source != "auto":
            raise ValueError(f"generation_config: no generation_config.json in {folder}") from None
        return NO_SAMPLING_DEFAULTS
    # NOTE: what the file sets (to_diff_dict, as vLLM reads it): transformers' own fallbacks,
    # such as top_k=50 in generate, never become defaults here.
    diff = config.to_diff_dict()
    values = {f.name: diff.get(f.name) for f in fields(SamplingDefaults) if f.name != "max_tokens"}
    if values["top_k"] == 0:
        values["top_k"] = -1  # transformers' "no top-k" is SamplingParams' -1
    defaults = SamplingDefaults(**values, max_tokens=diff.get("max_new_tokens"))
    if defaults != NO_SAMPLING_DEFAULTS:
        logger.info("sampling defaults from %s/generation_config.json (requests that set these "
                    "override them; --generation-config vllm ignores them): %s", folder,
                    {**defaults.sampling_values(), "max_tokens cap": defaults.max_tokens})
    return defaults
