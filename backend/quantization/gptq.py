"""GPTQ checkpoints (AutoGPTQ, GPTQModel, AutoRound's auto_gptq export).

On disk, per layer: qweight int32 [in * bits/32, out] (packed along the input features),
qzeros int32 [groups, out * bits/32], scales [groups, out], g_idx int32 [in] (the group of each
input feature: permuted when quantized in activation order, desc_act). The original ("gptq",
v1) format stores each zero point minus one; "gptq_v2" stores it as is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from pagoda.backend.models.layers import UNQUANTIZED, Linear, LinearMethod
from pagoda.backend.quantization.base import QuantizationConfig, get_field
from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.packing import unpack_int32, values_per_word
from pagoda.backend.quantization.weight_only import (
    PackedLayout,
    StagedTensor,
    WeightOnlyIntMethod,
    groups_of,
    same_g_idx,
)

GPTQ_BITS = (2, 4, 8)


@dataclass(frozen=True)
class GPTQLayout(PackedLayout):
    bits: int
    group_size: int  # -1: one group per output channel
    zeros_minus_one: bool  # the v1 format's stored zero point is zero - 1
    # GPTQModel writes g_idx only with desc_act, AutoGPTQ always: contiguous groups without.
    optional_tensors = ("g_idx",)

    def staged_tensors(self, layer: Linear) -> dict[str, StagedTensor]:
        per_word = values_per_word(self.bits)
        groups = groups_of(layer, self.group_size, "gptq")
        if layer.input_size % per_word or layer.output_size % per_word:
            raise ValueError(f"gptq: a layer of {layer.input_size} -> {layer.output_size} "
                             f"features does not pack into {self.bits}-bit words")
        return {
            "qweight": StagedTensor((layer.input_size // per_word, layer.output_size),
                                    torch.int32, out_dim=1),
            "qzeros": StagedTensor((groups, layer.output_size // per_word), torch.int32,
                                   out_dim=1, out_per_element=per_word),
            "scales": StagedTensor((groups, layer.output_size), torch.float32, out_dim=1),
            "g_idx": StagedTensor((layer.input_size,), torch.int32, out_dim=None),
        }

    def int_weights(self, staged: dict[str, torch.Tensor], layer: Linear) -> IntWeights:
        zeros = unpack_int32(staged["qzeros"], self.bits, dim=1)
        if self.zeros_minus_one:
            # (zero - 1) was stored wrapped to `bits` bits: a zero of 0 reads back as 2^bits-1.
            zeros = (zeros + 1) & ((1 << self.bits) - 1)
        return IntWeights(
            bits=self.bits,
            qweight=unpack_int32(staged["qweight"], self.bits, dim=0).t(),
            zeros=zeros.t(),
            scales=staged["scales"].t(),
            g_idx=same_g_idx(staged["g_idx"], "gptq") if "g_idx" in staged else None,
        )


class GPTQConfig(QuantizationConfig):
    scheme = "gptq"

    def __init__(self, config: dict) -> None:
        bits = int(get_field(config, "bits", self.scheme))
        if bits not in GPTQ_BITS:
            raise ValueError(f"gptq: bits={bits} is not supported (supported: {GPTQ_BITS})")
        checkpoint_format = get_field(config, "checkpoint_format", self.scheme, "gptq")
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format {checkpoint_format!r} is not supported "
                             "(supported: 'gptq', 'gptq_v2')")
        if config.get("lm_head"):
            raise ValueError("gptq: a quantized lm_head (lm_head=true) is not supported "
                             "(supported: the LM head left dense)")
        self.layout = GPTQLayout(bits, int(get_field(config, "group_size", self.scheme, -1)),
                                 zeros_minus_one=checkpoint_format == "gptq")
        # GPTQModel's per-module overrides: "-:<regex>" leaves matching modules dense,
        # "+:<regex>" (or a bare regex) changes their bits or group size.
        self.dynamic: dict[str, dict] = get_field(config, "dynamic", self.scheme, None) or {}
        # Modules quantized inside each block; None: every linear layer of the blocks.
        self.quantized_modules = _flatten(config.get("modules_in_block_to_quantize"))

    def linear_method(self, module: str) -> LinearMethod:
        if self.quantized_modules is not None and \
                module.rpartition(".")[2] not in self.quantized_modules:
            return UNQUANTIZED
        layout = self.layout
        for pattern, overrides in self.dynamic.items():
            sign, _, regex = pattern.rpartition(":")
            if not re.match(regex, f"model.{module}") and not re.match(regex, module):
                continue
            if sign == "-":
                return UNQUANTIZED
            layout = replace(layout, bits=int(overrides.get("bits", layout.bits)),
                             group_size=int(overrides.get("group_size", layout.group_size)))
            break
        return WeightOnlyIntMethod(layout)


def _flatten(names: list | None) -> set[str] | None:
    """modules_in_block_to_quantize ([["self_attn.q_proj", ...], ["mlp.down_proj"]]) as the
    set of the modules' own names."""
    if not names:
        return None
    flat = [name for entry in names for name in (entry if isinstance(entry, list) else [entry])]
    return {name.rpartition(".")[2] for name in flat}
