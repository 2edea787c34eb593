"""compressed-tensors checkpoints (llm-compressor; AutoRound's llm_compressor export).

A quantization_config lists config_groups, each a set of targets (the class "Linear", module
names, or "re:" regexes) with the arguments of their weights and input activations, plus an
ignore list of modules left dense. Supported here: integer weight-only groups stored
pack-quantized (W4A16, W8A16; symmetric or asymmetric; per channel or per group; GPTQ's
activation order with weight_g_idx), and 8-bit weights stored unpacked: int-quantized (W8A8
int8) and float-quantized (FP8 per channel, per tensor or in blocks), with input activations
quantized dynamically per token or per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.backend.models.layers import UNQUANTIZED, Linear, LinearMethod, OutputPart
from pagoda.backend.quantization.activations import DynamicActivations
from pagoda.backend.quantization.base import QuantizationConfig, get_field, matches_name
from pagoda.backend.quantization.dense_quantized import WEIGHT_STRATEGIES, DenseQuantizedMethod
from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.packing import unpack_int32, values_per_word
from pagoda.backend.quantization.weight_only import (
    PackedLayout,
    StagedTensor,
    WeightOnlyIntMethod,
    groups_of,
    same_g_idx,
)

SCHEME = "compressed-tensors"
PACKED_BITS = (2, 4, 8)
STRATEGIES = ("channel", "group")
# Formats storing 8-bit weights unpacked -> the type of their weights.
EIGHT_BIT_FORMATS = {"int-quantized": "int", "float-quantized": "float"}
SUPPORTED = ("weight-only int stored pack-quantized (W4A16, W8A16), int-quantized (W8A8 int8) "
             "and float-quantized (FP8) with dynamic activations")


@dataclass(frozen=True)
class PackQuantizedLayout(PackedLayout):
    """weight_packed int32 [out, in * bits/32] holding q + 2^(bits-1), weight_scale
    [out, groups], and when asymmetric weight_zero_point int32 [out * bits/32, groups] packed
    the same way along the output features; weight_g_idx [in] with actorder "group"."""

    bits: int
    group_size: int | None  # None: per channel
    symmetric: bool
    has_g_idx: bool
    metadata_tensors = ("weight_shape",)

    def staged_tensors(self, layer: Linear) -> dict[str, StagedTensor]:
        per_word = values_per_word(self.bits)
        groups = groups_of(layer, self.group_size, SCHEME)
        if layer.input_size % per_word or layer.output_size % per_word:
            raise ValueError(f"{SCHEME}: a layer of {layer.input_size} -> {layer.output_size} "
                             f"features does not pack into {self.bits}-bit words")
        tensors = {
            "weight_packed": StagedTensor((layer.output_size, layer.input_size // per_word),
                                          torch.int32, out_dim=0),
            "weight_scale": StagedTensor((layer.output_size, groups), torch.float32, out_dim=0),
        }
        if not self.symmetric:
            tensors["weight_zero_point"] = StagedTensor(
                (layer.output_size // per_word, groups), torch.int32, out_dim=0,
                out_per_element=per_word)
        if self.has_g_idx:
            tensors["weight_g_idx"] = StagedTensor((layer.input_size,), torch.int32, None)
        return tensors

    def int_weights(self, staged: dict[str, torch.Tensor], layer: Linear) -> IntWeights:
        scales = staged["weight_scale"]
        if self.symmetric:
            zeros = torch.full(scales.shape, 1 << (self.bits - 1), dtype=torch.int32,
                               device=scales.device)
        else:
            zeros = unpack_int32(staged["weight_zero_point"], self.bits, dim=0)
        g_idx = same_g_idx(staged["weight_g_idx"], SCHEME) if self.has_g_idx else None
        return IntWeights(self.bits, unpack_int32(staged["weight_packed"], self.bits, dim=1),
                          zeros, scales, g_idx)

    def verify(self, tensor_name: str, tensor: torch.Tensor, layer: Linear,
               part: OutputPart) -> bool:
        if tensor_name != "weight_shape":
            return False
        if tensor.tolist() != [part.size, layer.input_size]:
            raise ValueError(f"{SCHEME}: weight_shape of part {part.name or '(whole)'} is "
                             f"{tensor.tolist()}, expected {[part.size, layer.input_size]}")
        return True


class CompressedTensorsConfig(QuantizationConfig):
    scheme = SCHEME

    def __init__(self, config: dict) -> None:
        groups = get_field(config, "config_groups", SCHEME)
        default_format = config.get("format")
        self.groups: list[tuple[list[str], LinearMethod]] = [
            (list(get_field(group, "targets", f"{SCHEME} {name}")),
             _group_method(name, group, group.get("format") or default_format))
            for name, group in groups.items()
        ]
        self.ignore: list[str] = list(config.get("ignore") or [])
        if config.get("sparsity_config"):
            raise ValueError(f"{SCHEME}: sparsity_config (sparse checkpoints) is not supported")

    def linear_method(self, module: str) -> LinearMethod:
        if any(matches_name(pattern, module) for pattern in self.ignore):
            return UNQUANTIZED
        for targets, method in self.groups:
            if any(target == "Linear" or matches_name(target, module) for target in targets):
                return method
        return UNQUANTIZED


def _group_method(name: str, group: dict, fmt: str | None) -> LinearMethod:
    weights = group.get("weights")
    activations = group.get("input_activations")
    where = f"{SCHEME} config_groups.{name}"
    if not weights:
        raise ValueError(f"{where} quantizes no weights, which is not supported")
    kind = weights.get("type", "int")
    if fmt in EIGHT_BIT_FORMATS:
        return _eight_bit_method(where, fmt, weights, activations)
    if activations:
        raise ValueError(f"{where}: format {fmt!r} with quantized input activations is not "
                         f"supported (supported: {SUPPORTED})")
    if fmt != "pack-quantized" or kind != "int":
        raise ValueError(f"{where}: format {fmt!r} with {kind} weights is not supported "
                         f"(supported: {SUPPORTED})")
    bits = int(weights["num_bits"])
    strategy = weights.get("strategy")
    if bits not in PACKED_BITS or strategy not in STRATEGIES:
        raise ValueError(f"{where}: {bits}-bit weights with strategy {strategy!r} are not "
                         f"supported (supported: {PACKED_BITS} bits, strategy {STRATEGIES})")
    group_size = int(weights["group_size"]) if strategy == "group" else None
    # NOTE: actorder "group" scatters groups over the input features and saves weight_g_idx;
    # actorder "weight" only orders the quantization and saves none.
    has_g_idx = weights.get("actorder") == "group"
    return WeightOnlyIntMethod(
        PackQuantizedLayout(bits, group_size, bool(weights.get("symmetric", True)), has_g_idx))


def _eight_bit_method(
    where: str, fmt: str, weights: dict, activations: dict | None
) -> LinearMethod:
    """int-quantized (int8 weights) or float-quantized (fp8 weights), activations dynamic or
    left alone."""
    kind = EIGHT_BIT_FORMATS[fmt]
    strategy = weights.get("strategy")
    if (weights.get("type", "int") != kind or int(weights["num_bits"]) != 8
            or not weights.get("symmetric", True) or strategy not in WEIGHT_STRATEGIES):
        raise ValueError(f"{where}: format {fmt!r} with {weights.get('num_bits')}-bit "
                         f"{weights.get('type')} weights, strategy {strategy!r}, symmetric="
                         f"{weights.get('symmetric')} is not supported (supported: symmetric "
                         f"8-bit {kind} weights per {', '.join(WEIGHT_STRATEGIES)})")
    block = tuple(weights["block_structure"]) if strategy == "block" else None
    return DenseQuantizedMethod(kind, strategy, block, _dynamic_activations(where, activations))


def _dynamic_activations(where: str, activations: dict | None) -> DynamicActivations | None:
    if not activations:
        return None
    strategy = activations.get("strategy")
    if (not activations.get("dynamic") or int(activations.get("num_bits", 0)) != 8
            or not activations.get("symmetric", True) or strategy not in ("token", "group")):
        raise ValueError(f"{where}: input activations {activations.get('num_bits')}-bit "
                         f"{activations.get('type')}, strategy {strategy!r}, dynamic="
                         f"{activations.get('dynamic')}, symmetric={activations.get('symmetric')} "
                         "are not supported (supported: dynamic symmetric 8-bit per token or "
                         "per group; static input scales are not)")
    group_size = int(activations["group_size"]) if strategy == "group" else None
    return DynamicActivations(activations.get("type", "int"), group_size)
