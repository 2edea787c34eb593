"""Building blocks the model families share: norms, rotary embeddings, linear layers whose
storage a LinearMethod decides, and checkpoint loading by transformers' tensor names."""

from pagoda.backend.models.layers.checkpoint import load_checkpoint
from pagoda.backend.models.layers.linear import (
    UNQUANTIZED,
    Linear,
    LinearMethod,
    OutputPart,
    UnquantizedLinearMethod,
    copy_rows,
)
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
    "Linear",
    "LinearMethod",
    "OutputPart",
    "RMSNorm",
    "RotaryAngles",
    "RotaryEmbedding",
    "UnquantizedLinearMethod",
    "apply_rotary",
    "copy_rows",
    "load_checkpoint",
    "materialize",
]
