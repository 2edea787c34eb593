"""Mixture-of-experts feed-forward: a router picks top_k experts per token, and each token's
output is the routing-weighted sum of those experts' gated SiLU MLPs.

The experts' weights are stacked, `gate_up_proj` [num_experts, 2 * intermediate, hidden] and
`down_proj` [num_experts, hidden, intermediate], and computed by `pagoda.kernels`: a grouped torch
computation (one matrix product per expert over its tokens) on CPU, the Triton fused-MoE kernel
on CUDA.

NOTE: the experts are a parameter set of their own rather than Linear layers: a LinearMethod
applies one matrix to every row, while the experts apply a different matrix to each group of
rows, and quantized experts need kernels that read their packed layout (vLLM, likewise, gives
fused MoE its own method base). The router and the shared experts of Qwen MoE are plain
projections and are made with `ModelContext.linear`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from pagoda.backend.models.layers.checkpoint import TensorSink
from pagoda.backend.models.layers.linear import Linear, OutputPart, copy_rows
from pagoda.kernels.fused_moe import fused_moe_reference

logger = logging.getLogger(__name__)

ExpertsFunction = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """What a checkpoint calls each expert's three projections ("experts.{e}.{name}.weight")."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (float32) and expert ids, both [num_tokens, top_k]: softmax over all
    experts in float32, the top_k most probable kept, rescaled to sum to 1 when `renormalize`
    (Mixtral always; Qwen MoE when norm_topk_prob). The weights stay float32 up to the weighted
    sum, as in transformers' Mixtral (its Qwen MoE rounds them to the model's dtype first)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, expert_ids


class StackedExperts(nn.Module):
    """num_experts gated SiLU MLPs (hidden -> intermediate -> hidden), weights stacked by expert;
    loaded from one checkpoint tensor per expert and projection."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, names: ExpertNames
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.names = names
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False
        )

    def checkpoint_sinks(self) -> dict[str, TensorSink]:
        """"{e}.{projection}.weight" -> its band of expert e's stacked weights."""
        size = self.intermediate_size
        sinks: dict[str, TensorSink] = {}
        for expert in range(self.num_experts):
            bands = (
                (self.names.gate, self.gate_up_proj, 0, size),
                (self.names.up, self.gate_up_proj, size, size),
                (self.names.down, self.down_proj, 0, self.down_proj.shape[1]),
            )
            for name, stacked, offset, rows in bands:
                part = OutputPart(f"experts.{expert}.{name}", offset, rows)
                sinks[f"{expert}.{name}.weight"] = _band_sink(stacked, expert, part)
        return sinks

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden [num_tokens, hidden]; the router's choices [num_tokens, top_k]."""
        return experts_function(hidden.device.type)(
            hidden, self.gate_up_proj, self.down_proj, topk_weights, topk_ids
        )

    def extra_repr(self) -> str:
        experts, hidden, intermediate = self.down_proj.shape
        return f"num_experts={experts}, hidden={hidden}, intermediate={intermediate}"


class SparseMoE(nn.Module):
    """The router (`gate`, hidden -> num_experts logits) and the experts it routes to."""

    def __init__(
        self, gate: Linear, experts: StackedExperts, top_k: int, renormalize: bool
    ) -> None:
        super().__init__()
        if gate.output_size != experts.num_experts:
            raise ValueError(f"the router has {gate.output_size} outputs for "
                             f"{experts.num_experts} experts")
        if not 0 < top_k <= experts.num_experts:
            raise ValueError(f"num_experts_per_tok is {top_k}, expected 1..{experts.num_experts}")
        self.gate = gate
        self.experts = experts
        self.top_k = top_k
        self.renormalize = renormalize

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route(self.gate(hidden), self.top_k, self.renormalize)
        return self.experts(hidden, weights, expert_ids)


def _band_sink(stacked: torch.Tensor, expert: int, part: OutputPart) -> TensorSink:
    return lambda tensor: copy_rows(stacked[expert], tensor, part, "weight")


@cache
def experts_function(device_type: str) -> ExpertsFunction:
    """The experts' computation for tensors on a device of this type: the Triton kernel on CUDA
    (when triton is installed), the grouped torch one elsewhere. Decided once per type."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            from pagoda.kernels.triton.fused_moe import fused_moe_triton

            return fused_moe_triton
        logger.warning("triton is not installed; experts run as grouped torch matmuls on CUDA")
    return fused_moe_reference
