"""Building blocks the model families share: norms, activations, rotary embeddings, linear
layers whose storage a LinearMethod decides, feed-forward blocks (gated, plain,
mixture-of-experts), and checkpoint loading by transformers' tensor names."""

from pagoda.backend.models.layers.activation import ACTIVATIONS, Activation, activation
from pagoda.backend.models.layers.checkpoint import LoadsOwnTensors, load_checkpoint
from pagoda.backend.models.layers.linear import (
    UNQUANTIZED,
    Linear,
    LinearMethod,
    OutputPart,
    UnquantizedLinearMethod,
    copy_rows,
)
from pagoda.backend.models.layers.mlp import GatedMLP, PlainMLP
from pagoda.backend.models.layers.moe import ExpertNames, SparseMoE, StackedExperts, route
from pagoda.backend.models.layers.norm import GemmaRMSNorm, LayerNorm, PerHeadLayerNorm, RMSNorm
from pagoda.backend.models.layers.rotary import (
    LONGROPE_ARCHITECTURES,
    SUPPORTED_ROPE_TYPES,
    LongRopeEmbedding,
    RotaryAngles,
    RotaryEmbedding,
    apply_rotary,
    materialize,
)

__all__ = [
    "ACTIVATIONS",
    "LONGROPE_ARCHITECTURES",
    "SUPPORTED_ROPE_TYPES",
    "UNQUANTIZED",
    "Activation",
    "ExpertNames",
    "GatedMLP",
    "GemmaRMSNorm",
    "LayerNorm",
    "Linear",
    "LinearMethod",
    "LoadsOwnTensors",
    "LongRopeEmbedding",
    "OutputPart",
    "PerHeadLayerNorm",
    "PlainMLP",
    "RMSNorm",
    "RotaryAngles",
    "RotaryEmbedding",
    "SparseMoE",
    "StackedExperts",
    "UnquantizedLinearMethod",
    "activation",
    "apply_rotary",
    "copy_rows",
    "load_checkpoint",
    "materialize",
    "route",
]
