"""Filling a model's parameters from checkpoint tensors named as in transformers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pagoda.backend.models.layers.linear import Linear, OutputPart

TensorSink = Callable[[torch.Tensor], None]


@runtime_checkable
class LoadsOwnTensors(Protocol):
    """A module whose parameters are not laid out as the checkpoint stores them (experts stacked
    into one tensor, one checkpoint tensor per expert): it routes its checkpoint tensors itself."""

    def checkpoint_sinks(self) -> dict[str, TensorSink]:
        """Checkpoint tensor name, relative to the module's path ("3.w1.weight"), -> what to do
        with it; between them they fill every parameter of the module itself."""


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    checkpoint_name: Callable[[str], str],
    skip: Callable[[str], bool] = lambda name: False,
) -> None:
    """Copy every checkpoint tensor into its place in `model`.

    `checkpoint_name` maps a module path in the model (e.g. "layers.0.self_attn.k_proj.weight")
    to the tensor's name in the checkpoint ("model.layers.0.self_attn.k_proj.weight").
    Checkpoint tensors for which `skip` is true are neither expected nor read (rotary tables,
    a tied LM head stored twice). Every other expected tensor must come exactly once; a missing
    or unexpected one is a ValueError.
    """
    sinks, optional = _tensor_sinks(model, checkpoint_name, skip)
    for name, tensor in weights:
        if skip(name):
            continue
        if name not in sinks:
            raise ValueError(f"unexpected tensor in checkpoint: {name}")
        sinks.pop(name)(tensor)
    missing = sorted(set(sinks) - optional)
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {missing[:8]}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.method.after_loading(module)


def _tensor_sinks(
    model: nn.Module, checkpoint_name: Callable[[str], str], skip: Callable[[str], bool]
) -> tuple[dict[str, TensorSink], set[str]]:
    """Checkpoint tensor name -> what to do with it, and the names that may be absent. A Linear
    takes a tensor per part and per name its method expects; a module that LoadsOwnTensors
    names its own; any other parameter is copied whole."""
    sinks: dict[str, TensorSink] = {}
    optional: set[str] = set()
    owned: set[int] = set()
    for module_path, module in model.named_modules():
        if isinstance(module, LoadsOwnTensors):
            for relative_name, sink in module.checkpoint_sinks().items():
                name = checkpoint_name(f"{module_path}.{relative_name}")
                if not skip(name):
                    sinks[name] = sink
            owned.update(id(param) for param in module.parameters(recurse=False))
            continue
        if not isinstance(module, Linear):
            continue
        parent, _, own_name = module_path.rpartition(".")
        for part in module.parts:
            part_path = ".".join(filter(None, (parent, part.name or own_name)))
            optional_names = module.method.optional_tensors(module)
            for tensor_name in module.method.checkpoint_tensors(module):
                name = checkpoint_name(f"{part_path}.{tensor_name}")
                if not skip(name):
                    sinks[name] = _linear_sink(module, tensor_name, part)
                    if tensor_name in optional_names:
                        optional.add(name)
                    # NOTE: only a Linear that loads something owns its parameters: a LM head
                    # tied to the embedding (its tensors skipped) leaves the shared matrix to
                    # the embedding's own entry below.
                    owned.update(id(param) for param in module.parameters(recurse=False))
    for path, param in model.named_parameters():
        if id(param) in owned:
            continue
        name = checkpoint_name(path)
        if not skip(name):
            sinks[name] = _copy_sink(param, name)
    return sinks, optional


def _linear_sink(layer: Linear, tensor_name: str, part: OutputPart) -> TensorSink:
    return lambda tensor: layer.method.load(layer, tensor_name, tensor, part)


def _copy_sink(param: nn.Parameter, name: str) -> TensorSink:
    def copy(tensor: torch.Tensor) -> None:
        if tensor.shape != param.shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)

    return copy
