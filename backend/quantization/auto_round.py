"""AutoRound checkpoints in its own format (quant_method "auto-round").

Its packing_format says how the weights are stored: "auto_round", "auto_round:auto_gptq" and
"auto_round:gptqmodel" are GPTQ's layout (zero point minus one; g_idx or not), and
"auto_round:auto_awq" (what auto-round 0.16 writes for asymmetric schemes) is AWQ's.
extra_config overrides bits or group size per module (16 bits or more: left dense), and only
modules inside block_name_to_quantize are quantized.
"""

from __future__ import annotations

from pagoda.backend.models.layers import UNQUANTIZED, LinearMethod
from pagoda.backend.quantization.awq import AWQLayout
from pagoda.backend.quantization.base import QuantizationConfig, checkpoint_spellings, get_field
from pagoda.backend.quantization.gptq import GPTQ_BITS, GPTQLayout
from pagoda.backend.quantization.weight_only import PackedLayout, WeightOnlyIntMethod

SCHEME = "auto-round"
PACKING_FORMATS = ("auto_round", "auto_round:auto_gptq", "auto_round:gptqmodel",
                   "auto_round:auto_awq")
DENSE_BITS = 16


class AutoRoundConfig(QuantizationConfig):
    scheme = SCHEME

    def __init__(self, config: dict) -> None:
        self.packing_format = str(get_field(config, "packing_format", SCHEME, "auto_round"))
        if self.packing_format not in PACKING_FORMATS:
            raise ValueError(f"{SCHEME}: packing_format {self.packing_format!r} is not "
                             f"supported (supported: {', '.join(PACKING_FORMATS)})")
        data_type = get_field(config, "data_type", SCHEME, "int")
        act_bits = int(get_field(config, "act_bits", SCHEME, DENSE_BITS) or DENSE_BITS)
        if data_type != "int" or act_bits < DENSE_BITS:
            raise ValueError(f"{SCHEME}: data_type {data_type!r} with {act_bits}-bit "
                             "activations is not supported (supported: int weights, 16-bit "
                             "activations)")
        self.bits = int(get_field(config, "bits", SCHEME))
        self.group_size = int(get_field(config, "group_size", SCHEME))
        self.extra_config: dict[str, dict] = config.get("extra_config") or {}
        blocks = config.get("block_name_to_quantize") or config.get("to_quant_block_names")
        self.blocks = [blocks] if isinstance(blocks, str) else blocks

    def linear_method(self, module: str) -> LinearMethod:
        names = checkpoint_spellings(module)
        if self.blocks and not any(name.startswith(f"{block}.") for name in names
                                   for block in _block_names(self.blocks)):
            return UNQUANTIZED
        bits, group_size = self.bits, self.group_size
        for name in names:
            if name in self.extra_config:
                overrides = self.extra_config[name]
                bits = int(overrides.get("bits", bits))
                group_size = int(overrides.get("group_size", group_size))
        if bits >= DENSE_BITS:
            return UNQUANTIZED
        return WeightOnlyIntMethod(self._layout(bits, group_size))

    def _layout(self, bits: int, group_size: int) -> PackedLayout:
        if "awq" in self.packing_format:
            return AWQLayout(bits, group_size)
        if bits not in GPTQ_BITS:
            raise ValueError(f"{SCHEME}: bits={bits} is not supported (supported: {GPTQ_BITS})")
        return GPTQLayout(bits, group_size, zeros_minus_one=True)


def _block_names(blocks: list) -> list[str]:
    """block_name_to_quantize may list names or, for models with several block stacks, lists
    of them."""
    return [name for entry in blocks for name in (entry if isinstance(entry, list) else [entry])]
