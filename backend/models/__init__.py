"""Model registry: architecture name (config.architectures) -> native implementation."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionBackend
from pagoda.backend.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def build_model(
    config: PretrainedConfig, backend: AttentionBackend, max_positions: int
) -> LlamaForCausalLM:
    architectures = getattr(config, "architectures", None) or []
    for architecture in architectures:
        if architecture in MODEL_REGISTRY:
            return MODEL_REGISTRY[architecture](config, backend, max_positions)
    raise ValueError(
        f"unsupported model architecture {architectures or config.model_type!r}; "
        f"supported: {sorted(MODEL_REGISTRY)}"
    )


__all__ = ["MODEL_REGISTRY", "build_model"]
