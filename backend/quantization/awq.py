"""AWQ checkpoints in the GEMM layout (AutoAWQ, AutoRound's auto_awq export).

On disk, per layer: qweight int32 [in, out/8] and qzeros int32 [groups, out/8], both packed
along the output features in AWQ's nibble order, and scales [groups, out]. Zero points are
stored as they are (asymmetric quantization, the only kind AWQ makes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.backend.models.layers import UNQUANTIZED, Linear, LinearMethod
from pagoda.backend.quantization.base import QuantizationConfig, get_field
from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.packing import unpack_awq, values_per_word
from pagoda.backend.quantization.weight_only import (
    PackedLayout,
    StagedTensor,
    WeightOnlyIntMethod,
    groups_of,
)

AWQ_VERSIONS = ("gemm",)


@dataclass(frozen=True)
class AWQLayout(PackedLayout):
    bits: int
    group_size: int

    def staged_tensors(self, layer: Linear) -> dict[str, StagedTensor]:
        per_word = values_per_word(self.bits)
        groups = groups_of(layer, self.group_size, "awq")
        if layer.output_size % per_word:
            raise ValueError(f"awq: {layer.output_size} output features do not pack into "
                             f"{self.bits}-bit words")
        return {
            "qweight": StagedTensor((layer.input_size, layer.output_size // per_word),
                                    torch.int32, out_dim=1, out_per_element=per_word),
            "qzeros": StagedTensor((groups, layer.output_size // per_word), torch.int32,
                                   out_dim=1, out_per_element=per_word),
            "scales": StagedTensor((groups, layer.output_size), torch.float32, out_dim=1),
        }

    def int_weights(self, staged: dict[str, torch.Tensor], layer: Linear) -> IntWeights:
        return IntWeights(
            bits=self.bits,
            qweight=unpack_awq(staged["qweight"], self.bits).t(),
            zeros=unpack_awq(staged["qzeros"], self.bits).t(),
            scales=staged["scales"].t(),
        )


class AWQConfig(QuantizationConfig):
    scheme = "awq"

    def __init__(self, config: dict) -> None:
        bits = int(get_field(config, "bits", self.scheme, None) or
                   get_field(config, "w_bit", self.scheme))
        if bits != 4:
            raise ValueError(f"awq: bits={bits} is not supported (supported: 4)")
        version = str(get_field(config, "version", self.scheme, "gemm")).lower()
        if version not in AWQ_VERSIONS:
            raise ValueError(f"awq: version {version!r} is not supported (supported: "
                             f"{', '.join(AWQ_VERSIONS)})")
        if not get_field(config, "zero_point", self.scheme, True):
            raise ValueError("awq: zero_point=false is not supported (supported: true)")
        group_size = get_field(config, "group_size", self.scheme, None) or \
            get_field(config, "q_group_size", self.scheme)
        self.method = WeightOnlyIntMethod(AWQLayout(bits, int(group_size)))
        # AutoAWQ leaves a module dense when any of these names is part of its path.
        self.not_converted: list[str] = list(config.get("modules_to_not_convert") or [])

    def linear_method(self, module: str) -> LinearMethod:
        if any(name in module for name in self.not_converted):
            return UNQUANTIZED
        return self.method
