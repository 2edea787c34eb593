"""The quantization names Pagoda accepts (vLLM's), importable without torch."""

from __future__ import annotations

# Schemes read from a checkpoint's quantization_config (FP8 checkpoints in compressed-tensors'
# form, as llm-compressor writes them).
CHECKPOINT_SCHEMES = ("auto-round", "awq", "compressed-tensors", "gptq")
# Schemes applied at load to an unquantized checkpoint (weight-only, round to nearest).
ONLINE_SCHEMES = ("fp8", "int8")
QUANTIZATION_METHODS = tuple(sorted({*CHECKPOINT_SCHEMES, *ONLINE_SCHEMES}))
# Other spellings, as vLLM and the tools write them -> the scheme Pagoda runs them with.
ALIASES = {
    "gptq_marlin": "gptq",
    "gptq_bitblas": "gptq",
    "awq_marlin": "awq",
    "auto_round": "auto-round",
    "intel/auto-round": "auto-round",
    "compressed_tensors": "compressed-tensors",
}


def canonical_scheme(name: str) -> str:
    """A scheme's name as Pagoda knows it (aliases resolved, case folded); the name unchanged
    when Pagoda does not know it."""
    folded = name.strip().lower()
    return ALIASES.get(folded, folded)
