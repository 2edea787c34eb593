"""The Triton attention backend against the torch one: a mixed step through the interface, block
copies, the choice of backend, and the demo model end to end. On CPU under Triton's interpreter
(conftest.py turns it on) and compiled on CUDA (gpu marker)."""

from __future__ import annotations

import pytest
import torch
import triton_devices
from batch_layouts import layout_from_pieces

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.attention import (
    ATTENTION_BACKEND_ENV,
    BatchLayout,
    TorchAttentionBackend,
    get_attention_backend,
)

triton_backend = pytest.importorskip("pagoda.backend.attention.triton_backend")

BLOCK_SIZE = 16
NUM_BLOCKS = 32


@pytest.fixture(params=triton_devices.DEVICES)
def device(request) -> torch.device:
    torch.manual_seed(0)
    return triton_devices.require(request.param)


def _layout(pieces: list[tuple[int, int]], device: torch.device) -> BatchLayout:
    """A step feeding (context, new tokens) per sequence, its blocks spread over the cache."""
    ids = torch.randperm(NUM_BLOCKS).tolist()
    with_tables = []
    for context, new in pieces:
        count = -(-(context + new) // BLOCK_SIZE)
        table, ids = ids[:count], ids[count:]
        with_tables.append((table, context, new))
    return layout_from_pieces(with_tables, BLOCK_SIZE, device)


@pytest.mark.parametrize(
    ("sliding_window", "soft_cap"), [(None, None), (24, None), (24, 1.5)],
    ids=["global", "window", "window-softcap"],
)
def test_mixed_step_matches_the_torch_backend(device, sliding_window, soft_cap):
    num_heads, num_kv_heads, head_dim = 8, 2, 32
    # Decodes (one at a block boundary), a prefill chunk over a context, a whole prompt.
    layout = _layout([(40, 1), (20, 12), (0, 23), (15, 1)], device)
    num_tokens = layout.query_start_loc[-1]
    query = torch.randn(num_tokens, num_heads, head_dim, device=device)
    key, value = torch.randn(2, num_tokens, num_kv_heads, head_dim, device=device)
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    caches = torch.randn(2, *shape, device=device)  # the contexts stored by earlier steps
    outputs, stored = [], []
    for backend in (TorchAttentionBackend(), triton_backend.TritonAttentionBackend()):
        key_cache, value_cache = caches[0].clone(), caches[1].clone()
        metadata = backend.prepare(layout, device)
        outputs.append(backend.forward(
            query, key, value, key_cache, value_cache, metadata, head_dim**-0.5,
            sliding_window=sliding_window, soft_cap=soft_cap,
        ))
        stored.append((key_cache, value_cache))
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-5, rtol=1e-4)
    assert torch.equal(stored[1][0], stored[0][0]) and torch.equal(stored[1][1], stored[0][1])


@pytest.mark.parametrize(
    "copies", [[(3, 9), (4, 20)], [(3, 9), (9, 4)]], ids=["disjoint", "target-was-a-source"]
)
def test_copy_blocks_reads_every_source_before_writing(device, copies):
    caches = [tuple(torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, 2, 8, device=device)) for _ in range(2)]
    expected = [(k.clone(), v.clone()) for k, v in caches]
    TorchAttentionBackend().copy_blocks(expected, copies)
    triton_backend.TritonAttentionBackend().copy_blocks(caches, copies)
    for (key, value), (key_ref, value_ref) in zip(caches, expected):
        assert torch.equal(key, key_ref) and torch.equal(value, value_ref)


def test_backend_choice_follows_the_device_and_the_environment(monkeypatch):
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)
    assert isinstance(get_attention_backend(torch.device("cpu")), TorchAttentionBackend)
    assert isinstance(
        get_attention_backend(torch.device("cuda")), triton_backend.TritonAttentionBackend
    )
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    assert isinstance(get_attention_backend(torch.device("cuda")), TorchAttentionBackend)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match=ATTENTION_BACKEND_ENV):
        get_attention_backend(torch.device("cpu"))
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    monkeypatch.setattr(triton_backend, "interpreting", lambda: True)
    assert isinstance(
        get_attention_backend(torch.device("cpu")), triton_backend.TritonAttentionBackend
    )
    monkeypatch.setattr(triton_backend, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        get_attention_backend(torch.device("cpu"))


def test_demo_model_gives_the_same_tokens_as_with_torch_attention(
    demo_model_dir, device, monkeypatch
):
    """Greedy prompts split into chunks (a prefill over a cached context, decodes batched with
    prefills) and seeded samples that fork and copy their shared last block."""
    prompts = [[1, 5, 9, 200, 31, 7, 77, 12, 400, 18, 3, 901, 65, 2000, 14, 8, 19, 30, 44],
               [1, 70, 71, 72]]
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    sampled = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=3, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(ATTENTION_BACKEND_ENV, backend)
        llm = LLM(str(demo_model_dir), device=device.type, dtype="float32", num_kv_blocks=32,
                  block_size=8, max_num_batched_tokens=12, enable_prefix_caching=False)
        outputs = llm.generate(prompts + [prompts[1]], [greedy, greedy, sampled], use_tqdm=False)
        results[backend] = [[c.token_ids for c in output.outputs] for output in outputs]
        llm.engine.check_no_leaks()
        if backend == "triton":
            assert llm.engine.block_manager.num_copy_on_write > 0
    assert results["triton"] == results["torch"]
