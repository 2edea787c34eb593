"""The mixture-of-experts computation: the grouped torch one (CPU path and reference) against
every expert computed for every token, and the Triton fused-MoE kernel against it, on CPU under
Triton's interpreter (conftest.py turns it on) and compiled on CUDA (gpu marker).

Shapes cover decode-sized steps (few tokens over many experts: blocks of 16 rows) and
prefill-sized ones (blocks of 64), sizes that are not powers of two (masked tiles), experts that
get no token, and every token choosing the same expert.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton_devices

from pagoda.kernels import fused_moe_reference

triton_kernels = pytest.importorskip("pagoda.kernels.triton")

# (num_tokens, num_experts, top_k, hidden_size, intermediate_size)
SHAPES = [
    pytest.param((3, 8, 2, 64, 32), id="decode"),
    pytest.param((70, 4, 2, 80, 48), id="prefill-masked"),
    pytest.param((33, 8, 3, 64, 96), id="top3"),
]
GPU_SHAPES = [pytest.param((1024, 64, 6, 1024, 512), marks=pytest.mark.gpu, id="serving")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# Half-precision operands round the activations stored between the two products.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 5e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


@pytest.fixture(params=triton_devices.DEVICES)
def device(request) -> torch.device:
    torch.manual_seed(0)
    return triton_devices.require(request.param)


def _experts(num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    scale = hidden_size**-0.5
    gate_up = torch.randn(num_experts, 2 * intermediate_size, hidden_size, device=device) * scale
    down = torch.randn(num_experts, hidden_size, intermediate_size, device=device) * scale
    return gate_up.to(dtype), down.to(dtype)


def _routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(num_tokens, num_experts, device=device).softmax(-1).topk(top_k)


def _every_expert_for_every_token(hidden, gate_up, down, topk_weights, topk_ids) -> torch.Tensor:
    """All experts' outputs for all tokens (float64), then each token's chosen ones weighted."""
    hidden, gate_up, down = hidden.double(), gate_up.double(), down.double()
    gate, up = torch.einsum("th,eih->tei", hidden, gate_up).chunk(2, dim=-1)
    outputs = torch.einsum("tei,ehi->teh", F.silu(gate) * up, down)
    chosen = outputs.gather(1, topk_ids[..., None].expand(-1, -1, outputs.shape[-1]))
    return (chosen * topk_weights[..., None].double()).sum(dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_experts_equal_every_expert_computed_for_every_token(shape):
    torch.manual_seed(0)
    num_tokens, num_experts, top_k, hidden_size, intermediate_size = shape
    hidden = torch.randn(num_tokens, hidden_size)
    gate_up, down = _experts(num_experts, hidden_size, intermediate_size, torch.float32)
    topk_weights, topk_ids = _routing(num_tokens, num_experts, top_k)
    actual = fused_moe_reference(hidden, gate_up, down, topk_weights, topk_ids)
    expected = _every_expert_for_every_token(hidden, gate_up, down, topk_weights, topk_ids)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


def test_experts_without_tokens_and_all_tokens_on_one_expert():
    torch.manual_seed(0)
    hidden = torch.randn(9, 64)
    gate_up, down = _experts(6, 64, 32, torch.float32)
    topk_ids = torch.full((9, 1), 4)
    topk_weights = torch.rand(9, 1)
    gate, up = F.linear(hidden, gate_up[4]).chunk(2, dim=-1)
    expected = F.linear(F.silu(gate) * up, down[4]) * topk_weights
    torch.testing.assert_close(fused_moe_reference(hidden, gate_up, down, topk_weights, topk_ids),
                               expected)
    empty = fused_moe_reference(hidden[:0], gate_up, down, topk_weights[:0], topk_ids[:0])
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("block_m", [16, 64])
def test_sort_by_expert_puts_every_pair_once_in_blocks_of_one_expert(block_m):
    torch.manual_seed(0)
    num_experts, num_tokens, top_k = 8, 37, 2
    _, topk_ids = _routing(num_tokens, num_experts, top_k)
    topk_ids[:, 0] = 2  # expert 2 gets more than a block's worth at block_m 16
    blocks = triton_kernels.sort_by_expert(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    pair_ids = blocks.pair_ids.view(-1, block_m)
    real = blocks.pair_ids[blocks.pair_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    flat_ids = topk_ids.flatten()
    for block, expert in enumerate(blocks.block_expert.tolist()):
        rows = pair_ids[block][pair_ids[block] < num_pairs]
        if expert == num_experts:  # past the last expert's blocks: nothing to do
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat_ids[rows.long()] == expert).all()
    # An expert's run keeps its pairs in token order (padding only at its end).
    for expert in range(num_experts):
        runs = pair_ids[blocks.block_expert == expert].flatten()
        assert runs[runs < num_pairs].tolist() == sorted(runs[runs < num_pairs].tolist())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + GPU_SHAPES)
def test_triton_fused_moe_matches_the_reference(device, dtype, shape):
    num_tokens, num_experts, top_k, hidden_size, intermediate_size = shape
    if device.type == "cpu" and num_tokens > 100:
        pytest.skip("serving sizes are for the compiled kernel")
    hidden = torch.randn(num_tokens, hidden_size, device=device).to(dtype)
    gate_up, down = _experts(num_experts, hidden_size, intermediate_size, dtype, device)
    topk_weights, topk_ids = _routing(num_tokens, num_experts, top_k, device)
    actual = triton_kernels.fused_moe_triton(hidden, gate_up, down, topk_weights, topk_ids)
    expected = fused_moe_reference(hidden.float(), gate_up.float(), down.float(), topk_weights,
                                   topk_ids)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected, **TOLERANCES[dtype])
