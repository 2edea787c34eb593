"""A LinearMethod for integer weight-only checkpoints (GPTQ, AWQ, AutoRound, compressed-tensors'
pack-quantized), generic over how a format lays its tensors out on disk.

Loading stages every checkpoint tensor as the format stores it (each fused part in its band of
the output features), then `after_loading` turns the staged tensors into `IntWeights` and hands
them to the kernel chosen for the device and compute dtype; the staging tensors are dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.backend.models.layers import Linear, LinearMethod, OutputPart, copy_rows
from pagoda.backend.quantization.int_weights import IntWeights
from pagoda.backend.quantization.kernels import int_kernel


@dataclass(frozen=True, slots=True)
class StagedTensor:
    """A checkpoint tensor as the format stores it, for the whole layer (all parts).

    `out_dim` is the dimension the output features run along, `out_per_element` how many output
    features one element there covers (8 for 4-bit values packed along the outputs). A tensor
    with out_dim None is per part, not per output feature (GPTQ's g_idx): it is staged as
    [num_parts, *shape]."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    out_dim: int | None
    out_per_element: int = 1


class PackedLayout(ABC):
    """One on-disk layout of integer weights (bits, group size and packing fixed by the
    checkpoint's configuration)."""

    bits: int
    # Checkpoint tensors that only describe the others (checked by `verify`, never staged).
    metadata_tensors: tuple[str, ...] = ()
    # Staged tensors some writers leave out; int_weights finds them missing from `staged`.
    optional_tensors: tuple[str, ...] = ()

    @abstractmethod
    def staged_tensors(self, layer: Linear) -> dict[str, StagedTensor]:
        """Checkpoint tensor name -> how it is staged, for this layer's sizes; "bias" is handled
        by the method."""

    @abstractmethod
    def int_weights(self, staged: dict[str, torch.Tensor], layer: Linear) -> IntWeights:
        """The staged tensors in the common form."""

    def verify(self, tensor_name: str, tensor: torch.Tensor, layer: Linear,
               part: OutputPart) -> bool:
        """Check a tensor that carries only metadata (compressed-tensors' weight_shape) and
        return True when it is one: it is then not staged."""
        return False


def groups_of(layer: Linear, group_size: int | None, scheme: str) -> int:
    """How many quantization groups the layer's input features make (group size None or -1,
    or one at least as large as the input: one group, per output channel)."""
    if group_size in (None, -1) or group_size >= layer.input_size:
        return 1
    if layer.input_size % group_size:
        raise ValueError(f"{scheme}: group_size {group_size} does not divide the input size "
                         f"{layer.input_size} of a layer")
    return layer.input_size // group_size


class WeightOnlyIntMethod(LinearMethod):
    """Integer weights and float activations, the layout given by `layout`."""

    def __init__(self, layout: PackedLayout) -> None:
        self.layout = layout

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightOnlyIntMethod) and other.layout == self.layout

    def __hash__(self) -> int:
        return hash(self.layout)

    def create_weights(self, layer: Linear) -> None:
        layer.params_dtype = torch.get_default_dtype()
        # Optional tensor name -> how many parts brought one.
        layer.optional_loaded = dict.fromkeys(self.layout.optional_tensors, 0)
        for name, spec in self.layout.staged_tensors(layer).items():
            shape = spec.shape if spec.out_dim is not None else (len(layer.parts), *spec.shape)
            layer.register_buffer(name, torch.empty(shape, dtype=spec.dtype))
        layer.bias = (nn.Parameter(torch.empty(layer.output_size), requires_grad=False)
                      if layer.has_bias else None)

    def checkpoint_tensors(self, layer: Linear) -> list[str]:
        names = list(self.layout.staged_tensors(layer))
        names += self.layout.metadata_tensors
        return names + ["bias"] if layer.has_bias else names

    def optional_tensors(self, layer: Linear) -> list[str]:
        return list(self.layout.optional_tensors)

    def load(self, layer: Linear, tensor_name: str, tensor: torch.Tensor, part: OutputPart) -> None:
        if tensor_name in layer.optional_loaded:
            layer.optional_loaded[tensor_name] += 1
        if tensor_name == "bias":
            copy_rows(layer.bias, tensor, part, tensor_name)
            return
        if self.layout.verify(tensor_name, tensor, layer, part):
            return
        spec = self.layout.staged_tensors(layer)[tensor_name]
        staged = getattr(layer, tensor_name)
        if spec.out_dim is None:
            row = OutputPart(part.name, layer.parts.index(part), 1)
            copy_rows(staged, tensor.unsqueeze(0), row, tensor_name)
            return
        band = _packed_band(part, spec.out_per_element, tensor_name)
        copy_rows(staged, tensor, band, tensor_name, dim=spec.out_dim)

    def after_loading(self, layer: Linear) -> None:
        names = list(self.layout.staged_tensors(layer))
        staged = {name: layer._buffers.pop(name) for name in names}
        for name, count in layer.optional_loaded.items():
            if count == 0:
                del staged[name]
            elif count != len(layer.parts):
                raise ValueError(f"{name} comes with {count} of the {len(layer.parts)} fused "
                                 f"parts {[part.name for part in layer.parts]}: all or none")
        del layer.optional_loaded
        weights = self.layout.int_weights(staged, layer)
        layer.kernel = int_kernel(weights, layer.params_dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = layer.kernel(x)
        return out + layer.bias if layer.bias is not None else out


def _packed_band(part: OutputPart, per_element: int, tensor_name: str) -> OutputPart:
    """The part's band in a tensor whose elements each cover `per_element` output features."""
    if part.offset % per_element or part.size % per_element:
        raise ValueError(f"tensor {tensor_name} of part {part.name or '(whole)'}: its "
                         f"{part.size} output features at offset {part.offset} do not fall on "
                         f"whole packed words of {per_element}")
    return OutputPart(part.name, part.offset // per_element, part.size // per_element)


def same_g_idx(g_idx: torch.Tensor, scheme: str) -> torch.Tensor:
    """The one g_idx [in] of a fused layer's parts (staged [num_parts, in]): the parts share
    their input, and the tools order a layer's input features by it alone."""
    if not bool((g_idx == g_idx[0]).all()):
        raise ValueError(f"{scheme}: the fused parts of a layer have different g_idx "
                         "(act-order permutations)")
    return g_idx[0]
