"""Building blocks the model families share: norms, rotary embeddings, linear layers whose
storage a LinearMethod decides, mixture-of-experts feed-forwards, and checkpoint loading by
transformers' tensor names."""

from pagoda.backend.models.layers.checkpoint import LoadsOwnTensors, load_checkpoint
from pagoda.backend.models.layers.linear import (
    UNQUANTIZED,
    Linear,
    LinearMethod,
    OutputPart,
    UnquantizedLinearMethod,
    copy_rows,
)
from pagoda.backend.models.layers.moe import ExpertNames, SparseMoE, StackedExperts, route
from pagoda.backend.models.layers.norm import RMSNorm
from pagoda.backend.models.layers.rotary import (
    SUPPORTED_ROPE_TYPES,
    RotaryAngles,
    RotaryEmbedding,
    apply_rotary,
    materialize,
)

__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "UNQUANTIZED",
    "ExpertNames",
    "Linear",
    "LinearMethod",
    "LoadsOwnTensors",
    "OutputPart",
    "RMSNorm",
    "RotaryAngles",
    "RotaryEmbedding",
    "SparseMoE",
    "StackedExperts",
    "UnquantizedLinearMethod",
    "apply_rotary",
    "copy_rows",
    "load_checkpoint",
    "materialize",
    "route",
]
