"""Which quantization a model is loaded with: the checkpoint's (config.json's
quantization_config), or an online scheme asked for with `quantization=`; refusals name the
scheme and what is supported."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PretrainedConfig

from pagoda.backend.quantization.awq import AWQConfig
from pagoda.backend.quantization.auto_round import AutoRoundConfig
from pagoda.backend.quantization.base import QuantizationConfig
from pagoda.backend.quantization.compressed_tensors import CompressedTensorsConfig
from pagoda.backend.quantization.gptq import GPTQConfig
from pagoda.backend.quantization.names import CHECKPOINT_SCHEMES, ONLINE_SCHEMES, canonical_scheme
from pagoda.backend.quantization.online import OnlineConfig

CHECKPOINT_CONFIGS: dict[str, Callable[[dict], QuantizationConfig]] = {
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "auto-round": AutoRoundConfig,
    "compressed-tensors": CompressedTensorsConfig,
}


def resolve_quantization(
    hf_config: PretrainedConfig, requested: str | None
) -> QuantizationConfig | None:
    """The scheme to load the model with, or None for dense weights. `requested` (the
    `quantization` argument) must agree with a quantized checkpoint; for an unquantized one it
    names an online scheme. Raises ValueError naming the scheme and what is supported."""
    checkpoint = _quantization_config(hf_config)
    wanted = canonical_scheme(requested) if requested else None
    if checkpoint is None:
        if wanted is None:
            return None
        if wanted not in ONLINE_SCHEMES:
            raise ValueError(
                f"quantization={requested!r} needs a checkpoint quantized with it, and this one "
                f"is not quantized; online quantization of an unquantized checkpoint: "
                f"{', '.join(ONLINE_SCHEMES)}"
            )
        return OnlineConfig(wanted)
    method = canonical_scheme(str(checkpoint.get("quant_method") or "unknown"))
    if wanted is not None and wanted != method:
        raise ValueError(
            f"quantization={requested!r} does not match the checkpoint, which is quantized with "
            f"{method}; leave quantization unset or pass {method!r}"
        )
    if method not in CHECKPOINT_CONFIGS:
        also = " (FP8 checkpoints are read in compressed-tensors' form, as llm-compressor writes "\
               "them; --quantization fp8 quantizes an unquantized checkpoint at load)" \
            if method == "fp8" else ""
        supported = ", ".join(CHECKPOINT_SCHEMES)
        raise ValueError(f"the checkpoint is quantized with {method}, which Pagoda does not load"
                         f"{also}; supported quantized checkpoints: {supported}")
    return CHECKPOINT_CONFIGS[method](checkpoint)


def _quantization_config(hf_config: PretrainedConfig) -> dict | None:
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    # transformers may hand back its own config object instead of the dict from config.json.
    return config if isinstance(config, dict) else config.to_dict()
