"""Building blocks the model families share: norms, rotary embeddings, linear layers whose
storage a LinearMethod decides, feed-forward blocks (gated, plain, mixture-of-experts) and
activations, and checkpoint loading by transformers' tensor names."""

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
from pagoda.backend.models.layers.norm import GemmaRMSNorm, RMSNorm
from pagoda.backend.models.layers.rotary import (
    SUPPORTED_ROPE_TYPES,
    RotaryAngles,
    RotaryEmbedding,
    apply_rotary,
    materialize,
)

__all__ = [
    "ACTIVATIONS",
    "SUPPORTED_ROPE_TYPES",
    "UNQUANTIZED",
    "Activation",
    "ExpertNames",
    "GatedMLP",
    "GemmaRMSNorm",
    "Linear",
    "LinearMethod",
    "LoadsOwnTensors",
    "OutputPart",
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
