"""The mixture-of-experts layer: routing (softmax, top-k, renormalization), stacked experts filled
from one checkpoint tensor per expert and projection (missing and misshapen ones named), and the
sparse block's output against the experts computed one by one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.backend.models.layers import (
    ExpertNames,
    Linear,
    SparseMoE,
    StackedExperts,
    load_checkpoint,
    route,
)
from pagoda.backend.models.layers.moe import experts_function
from pagoda.kernels import fused_moe_reference

NAMES = ExpertNames(gate="w1", up="w3", down="w2")


class _Block(nn.Module):
    def __init__(self, top_k: int = 2, renormalize: bool = True) -> None:
        super().__init__()
        self.moe = SparseMoE(Linear(8, 4, bias=False), StackedExperts(4, 8, 6, NAMES), top_k,
                             renormalize)


def _tensors() -> dict[str, torch.Tensor]:
    tensors = {"m.moe.gate.weight": torch.randn(4, 8)}
    for expert in range(4):
        tensors[f"m.moe.experts.{expert}.w1.weight"] = torch.randn(6, 8)
        tensors[f"m.moe.experts.{expert}.w3.weight"] = torch.randn(6, 8)
        tensors[f"m.moe.experts.{expert}.w2.weight"] = torch.randn(8, 6)
    return tensors


def test_routing_keeps_the_top_k_of_the_softmax_renormalized_or_not():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    probs = logits.softmax(-1)
    weights, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(weights, probs.gather(1, ids))
    weights, ids = route(logits.half(), 2, renormalize=True)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, True),
                               atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


@pytest.mark.parametrize("renormalize", [True, False])
def test_sparse_block_loaded_per_expert_equals_its_experts_one_by_one(renormalize):
    torch.manual_seed(0)
    block, tensors = _Block(renormalize=renormalize), _tensors()
    load_checkpoint(block, tensors.items(), lambda path: f"m.{path}")
    hidden = torch.randn(5, 8)
    probs = (hidden @ tensors["m.moe.gate.weight"].T).softmax(-1)
    expected = torch.zeros(5, 8)
    for token in range(5):
        top = probs[token].topk(2)
        scale = top.values.sum() if renormalize else 1.0
        for weight, expert in zip(top.values, top.indices.tolist()):
            gate = hidden[token] @ tensors[f"m.moe.experts.{expert}.w1.weight"].T
            up = hidden[token] @ tensors[f"m.moe.experts.{expert}.w3.weight"].T
            out = (F.silu(gate) * up) @ tensors[f"m.moe.experts.{expert}.w2.weight"].T
            expected[token] += weight / scale * out
    torch.testing.assert_close(block.moe(hidden), expected)


def test_missing_and_misshapen_expert_tensors_are_named():
    tensors = _tensors()
    del tensors["m.moe.experts.3.w2.weight"]
    with pytest.raises(ValueError, match=r"lacks tensors: \['m.moe.experts.3.w2.weight'\]"):
        load_checkpoint(_Block(), tensors.items(), lambda path: f"m.{path}")
    tensors = _tensors() | {"m.moe.experts.1.w3.weight": torch.zeros(5, 8)}
    with pytest.raises(ValueError, match=r"experts.1.w3.*shape \(5, 8\), expected \(6, 8\)"):
        load_checkpoint(_Block(), tensors.items(), lambda path: f"m.{path}")


def test_a_router_that_does_not_fit_the_experts_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok is 5, expected 1..4"):
        _Block(top_k=5)
    with pytest.raises(ValueError, match="router has 3 outputs for 4 experts"):
        SparseMoE(Linear(8, 3, bias=False), StackedExperts(4, 8, 6, NAMES), 2, True)


def test_experts_run_the_triton_kernel_on_cuda_and_grouped_torch_elsewhere():
    triton_kernels = pytest.importorskip("pagoda.kernels.triton")
    assert experts_function("cuda") is triton_kernels.fused_moe_triton
    assert experts_function("cpu") is fused_moe_reference
