"""What every quantization scheme gives the model loader, and how schemes name modules."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from pagoda.backend.models.layers import LinearMethod


class QuantizationConfig(ABC):
    """A checkpoint's (or an online) quantization scheme: the LinearMethod of each layer."""

    # The scheme's name as --quantization spells it.
    scheme: str
    # Whether the checkpoint's tensors are quantized (False: dense ones, quantized at load).
    from_checkpoint: bool = True

    @abstractmethod
    def linear_method(self, module: str) -> LinearMethod:
        """The method storing the linear layer whose checkpoint module is `module` (its path in
        the model, e.g. "layers.0.self_attn.q_proj"; the parts of a fused layer are asked
        one by one and must agree)."""


def checkpoint_spellings(module: str) -> tuple[str, str]:
    """The names a quantization config may use for a module: the model's path, and the path
    inside transformers' base model ("model." + path), which is how checkpoints name it.
    NOTE: matching both keeps the families' own name mapping out of quantization."""
    return module, f"model.{module}"


def matches_name(pattern: str, module: str) -> bool:
    """compressed-tensors' and gptqmodel's rule: a name equal to the module's, or "re:<regex>"
    matching it from the start."""
    if pattern.startswith("re:"):
        return any(re.match(pattern[3:], name) for name in checkpoint_spellings(module))
    return pattern in checkpoint_spellings(module)


def get_field(config: dict, key: str, scheme: str, default: object = ...) -> object:
    """A quantization_config field; a missing required one is a ValueError naming it."""
    if key in config:
        return config[key]
    if default is ...:
        raise ValueError(f"{scheme} quantization_config lacks {key!r}")
    return default
