"""The shared model layers: fused linears loaded band by band from separate checkpoint tensors,
checkpoint bookkeeping (missing, unexpected, misshapen, tied), partial rotary, activations and
LayerNorms and Gemma's RMSNorm as transformers computes them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.backend.models.layers import (
    ACTIVATIONS,
    GemmaRMSNorm,
    LayerNorm,
    Linear,
    PerHeadLayerNorm,
    activation,
    apply_rotary,
    load_checkpoint,
)


class _Block(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.qkv_proj = Linear(4, {"q_proj": 4, "k_proj": 2, "v_proj": 2}, bias=True)
        self.head = Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight


def _tensors(tied: bool) -> dict[str, torch.Tensor]:
    tensors = {f"m.{part}.{kind}": torch.randn(size, 4) if kind == "weight" else torch.randn(size)
               for part, size in (("q_proj", 4), ("k_proj", 2), ("v_proj", 2))
               for kind in ("weight", "bias")}
    tensors["m.embed.weight"] = torch.randn(10, 4)
    if not tied:
        tensors["m.head.weight"] = torch.randn(10, 4)
    return tensors


@pytest.mark.parametrize("tied", [False, True])
def test_a_fused_linear_applies_its_parts_as_the_separate_projections_would(tied):
    block, tensors = _Block(tied), _tensors(tied)
    # A tied head loads nothing of its own: the embedding's entry fills the shared matrix.
    load_checkpoint(block, tensors.items(), lambda path: f"m.{path}",
                    skip=lambda name: tied and name == "m.head.weight")
    x = torch.randn(3, 4)
    expected = torch.cat([x @ tensors[f"m.{part}.weight"].T + tensors[f"m.{part}.bias"]
                          for part in ("q_proj", "k_proj", "v_proj")], dim=-1)
    torch.testing.assert_close(block.qkv_proj(x), expected)
    head = tensors["m.embed.weight"] if tied else tensors["m.head.weight"]
    torch.testing.assert_close(block.head(x), x @ head.T)


def test_missing_unexpected_and_misshapen_tensors_are_named():
    tensors = _tensors(tied=False)
    del tensors["m.k_proj.bias"]
    with pytest.raises(ValueError, match=r"lacks tensors: \['m.k_proj.bias'\]"):
        load_checkpoint(_Block(False), tensors.items(), lambda path: f"m.{path}")
    tensors = _tensors(tied=False) | {"m.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected tensor in checkpoint: m.extra.weight"):
        load_checkpoint(_Block(False), tensors.items(), lambda path: f"m.{path}")
    tensors = _tensors(tied=False) | {"m.v_proj.weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match=r"v_proj.*shape \(3, 4\), expected \(2, 4\)"):
        load_checkpoint(_Block(False), tensors.items(), lambda path: f"m.{path}")


def test_partial_rotary_turns_the_leading_features_and_passes_the_rest():
    x = torch.randn(5, 2, 8)
    angle = torch.randn(5, 1, 2)
    cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
    out = apply_rotary(x, (cos, sin))
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    # The rotated pair (0, 2) keeps its norm and turns by the angle.
    torch.testing.assert_close(out[..., 0] ** 2 + out[..., 2] ** 2, x[..., 0] ** 2 + x[..., 2] ** 2)
    torch.testing.assert_close(out[..., :4], apply_rotary(x[..., :4], (cos, sin)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_are_transformers_own(name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 101)
    assert torch.equal(activation(name)(x), ACT2FN[name](x))


def test_an_unknown_activation_is_named_with_its_field():
    with pytest.raises(ValueError, match=r"activation_function 'gelu_10' is not supported"):
        activation("gelu_10", "activation_function")


def test_layer_norms_match_torch_and_transformers_per_head_norm():
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    x = torch.randn(3, 4, 8)
    norm = LayerNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference = torch.nn.LayerNorm(8, eps=1e-5)
    reference.load_state_dict(norm.state_dict())
    torch.testing.assert_close(norm(x), reference(x))
    assert LayerNorm(8, 1e-5, elementwise_affine=False).weight is None
    per_head = PerHeadLayerNorm(4, 8, 1e-5)
    theirs = StableLmLayerNormPerHead(8, 4, eps=1e-5)
    with torch.no_grad():
        for param in per_head.parameters():
            param.normal_()
    theirs.load_state_dict(per_head.state_dict())  # same names: norms.{head}.weight
    # transformers' heads are dimension 1 of [batch, heads, tokens, head_dim].
    expected = theirs(x.transpose(0, 1)[None])[0].transpose(0, 1)
    torch.testing.assert_close(per_head(x), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemma_rms_norm_is_bitwise_transformers(dtype):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, generator=generator) * 0.3
    x = (torch.randn(5, 64, generator=generator) * 3).to(dtype)
    ours, theirs = GemmaRMSNorm(64, 1e-6).to(dtype), Gemma2RMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(weight)
        theirs.weight.copy_(weight)
    assert torch.equal(ours(x), theirs(x))
