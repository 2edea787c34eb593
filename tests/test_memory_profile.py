"""Sizing the KV cache on a GPU: the budget arithmetic with given numbers, the block count it
gives, the profiling step on CPU (both attention backends), and the measurement on CUDA (gpu
marker)."""

from __future__ import annotations

import pytest
import torch

from pagoda.backend import LLM
from pagoda.backend.attention import ATTENTION_BACKEND_ENV
from pagoda.backend.config import EngineConfig
from pagoda.backend.kv.cache_tensors import allocate_kv_cache, choose_num_blocks
from pagoda.backend.memory_profile import (
    MemoryProfile,
    kv_cache_budget,
    profile_memory,
    run_profile_step,
)

GIB = 2**30
# An H200 with Llama-3-8B in bfloat16: 16 GiB of weights, 2 GiB of activations at 8k tokens.
H200_8B = MemoryProfile(total=140 * GIB, weights=16 * GIB, peak_activations=2 * GIB,
                        non_torch=GIB // 2)


def test_budget_is_utilization_less_weights_activations_non_torch_and_graph_reserve():
    assert kv_cache_budget(H200_8B, 0.9) == int(140 * GIB * 0.9) - 16 * GIB - 2 * GIB - GIB // 2
    assert kv_cache_budget(H200_8B, 0.9, cuda_graph_reserve_bytes=GIB) == (
        kv_cache_budget(H200_8B, 0.9) - GIB
    )
    assert kv_cache_budget(H200_8B, 1.0) - kv_cache_budget(H200_8B, 0.5) == 70 * GIB


def test_a_budget_with_nothing_left_names_every_term():
    small = MemoryProfile(total=24 * GIB, weights=16 * GIB, peak_activations=4 * GIB,
                          non_torch=GIB)
    with pytest.raises(ValueError) as error:
        kv_cache_budget(small, 0.85)
    message = str(error.value)
    for text in ("0.85 x 24576 MiB", "weights 16384 MiB", "peak activations 4096 MiB",
                 "non-torch 1024 MiB", "gpu_memory_utilization", "max_num_batched_tokens"):
        assert text in message
    assert kv_cache_budget(small, 1.0) == 3 * GIB


def test_the_profiled_budget_sizes_the_cache_on_cuda_unless_a_size_is_given():
    cuda, block_bytes = torch.device("cuda"), 2 * 2**20  # Llama-3-8B: 2 MiB per 16-token block
    budget = kv_cache_budget(H200_8B, 0.9)
    assert choose_num_blocks(EngineConfig(), block_bytes, cuda, 8192, budget) == budget // block_bytes
    assert choose_num_blocks(EngineConfig(num_kv_blocks=7), block_bytes, cuda, 8192, budget) == 7
    explicit = EngineConfig(kv_cache_memory_bytes=10 * block_bytes)
    assert choose_num_blocks(explicit, block_bytes, cuda, 8192, budget) == 10
    with pytest.raises(ValueError, match="holds no block"):
        choose_num_blocks(EngineConfig(), block_bytes, cuda, 8192, block_bytes - 1)


@pytest.fixture(scope="module", params=["torch", "triton"])
def demo_model(request, demo_model_dir):
    """The demo model on CPU, attending with each backend (Triton under the interpreter)."""
    if request.param == "triton":
        pytest.importorskip("pagoda.backend.attention.triton_backend")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ATTENTION_BACKEND_ENV, request.param)
        llm = LLM(str(demo_model_dir), device="cpu", dtype="float32", num_kv_blocks=8)
    return llm.engine.model


def _scratch(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    num_layers, num_kv_heads, head_dim = model.kv_shape
    return allocate_kv_cache(num_layers, 1, 16, num_kv_heads, head_dim, torch.float32,
                             torch.device("cpu"))


def test_the_profile_step_samples_every_prompt_and_writes_no_kv(demo_model):
    scratch = _scratch(demo_model)
    # 45 tokens over 4 prompts (11, 11, 11 and 12 tokens), each drawing one token.
    output = run_profile_step(demo_model, torch.device("cpu"), 45, 4, scratch)
    assert sorted(output.tokens) == [0, 1, 2, 3]
    assert all(len(tokens) == 1 for tokens in output.tokens.values())
    assert all(not key.any() and not value.any() for key, value in scratch)


def test_more_prompts_than_tokens_makes_one_token_prompts(demo_model):
    output = run_profile_step(demo_model, torch.device("cpu"), 5, 256, _scratch(demo_model))
    assert sorted(output.tokens) == [0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_profile_on_cuda_measures_weights_and_activations_that_grow_with_tokens(
    demo_model_dir,
):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    llm = LLM(str(demo_model_dir), device="cuda", dtype="bfloat16", num_kv_blocks=8)
    model, cuda = llm.engine.model, torch.device("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    small = profile_memory(model, cuda, 256, 16, 16)
    large = profile_memory(model, cuda, 8192, 256, 16)
    assert small.weights >= weight_bytes
    assert 0 < small.peak_activations < large.peak_activations
    assert large.total == torch.cuda.mem_get_info(cuda)[1]
    assert 0 < kv_cache_budget(large, 0.9) < large.total
