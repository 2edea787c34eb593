"""Every Triton kernel against its torch reference: on CPU under Triton's interpreter (default
suite; conftest.py turns it on), and compiled on CUDA (gpu marker).

Shapes are small (the interpreter runs each program in numpy) but cover GQA and MHA, head_dim
64, 80 (not a power of two: masked) and 128, mixed context lengths (1, exact multiples of the
block size, several split-K partitions), chunked prefill over a cached context, sliding windows,
attention logit soft-capping (Gemma 2), padded slot -1 rows and block tables whose block ids are
scattered over the cache. bfloat16 is tested too: the kernels convert every load to float32,
which the interpreter computes right.
The large cases (32k contexts, batch 256) are in test_kernels_gpu.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton_devices

from pagoda.kernels import (
    copy_blocks_reference,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
    store_kv_reference,
)

triton_kernels = pytest.importorskip("pagoda.kernels.triton")

BLOCK_SIZE = 16
NUM_BLOCKS = 48
# (num_heads, num_kv_heads, head_dim): MHA, GQA, and a group of 3 heads (padded to 4 rows)
# with a head_dim that is not a power of two.
HEAD_SHAPES = [
    pytest.param((4, 4, 64), id="mha-64"),
    pytest.param((8, 2, 128), id="gqa-128"),
    pytest.param((6, 2, 80), id="gqa3-80"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
BF16 = pytest.param(torch.bfloat16, id="bf16")
# Outputs are rounded to the dtype; float16 operands of the kernels' matrix products (the
# probabilities) add a little more.
TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
}
# Small enough that capping changes most scores of unit-variance queries and keys (see
# test_soft_cap_changes_the_reference).
SOFT_CAP = 1.5
COMPILE_SCRIPT = Path(__file__).with_name("compile_kernels_for_cuda.py")


@pytest.fixture(params=triton_devices.DEVICES)
def device(request) -> torch.device:
    torch.manual_seed(0)
    return triton_devices.require(request.param)


def _caches(num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    return torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)


def _block_tables(seq_lens: list[int], device: torch.device) -> torch.Tensor:
    """Each sequence gets enough blocks, drawn from a shuffled cache, padded with block 0."""
    needed = [-(-seq_len // BLOCK_SIZE) for seq_len in seq_lens]
    ids = torch.randperm(NUM_BLOCKS).tolist()
    tables, taken = [], 0
    for count in needed:
        tables.append(ids[taken : taken + count] + [0] * (max(needed) - count))
        taken += count
    assert taken <= NUM_BLOCKS
    return torch.tensor(tables, dtype=torch.int32, device=device)


def _int32(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("dtype", [*DTYPES, BF16])
@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim"), [(2, 64), (2, 80), (16, 128)],
    ids=["2x64", "2x80", "16x128-two-chunks"],
)
def test_store_kv_skips_padding_rows(device, dtype, num_kv_heads, head_dim):
    num_tokens = 21
    # key and value as the model makes them: strided views into one fused qkv projection.
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=device).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, device=device)[:num_tokens]
    slots[[0, 7, num_tokens - 1]] = -1
    expected = _caches(num_kv_heads, head_dim, dtype, device)
    actual = tuple(cache.clone() for cache in expected)
    store_kv_reference(key, value, *expected, slots)
    triton_kernels.store_kv_triton(key, value, *actual, slots)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("dtype", [*DTYPES, BF16])
def test_copy_blocks(device, dtype):
    layers = [_caches(2, 32, dtype, device) for _ in range(3)]
    expected = [(k.clone(), v.clone()) for k, v in layers]
    sources, targets = _int32([3, 17, 40, 9], device), _int32([30, 2, 11, 47], device)
    copy_blocks_reference(expected, sources.long(), targets.long())
    triton_kernels.copy_blocks_triton(layers, sources, targets)
    for (key, value), (key_ref, value_ref) in zip(layers, expected):
        assert torch.equal(key, key_ref) and torch.equal(value, value_ref)


@pytest.mark.parametrize("dtype", [*DTYPES, BF16])
@pytest.mark.parametrize("heads", HEAD_SHAPES)
@pytest.mark.parametrize(
    ("partition_size", "sliding_window", "soft_cap"),
    [(512, None, None), (32, None, None), (32, 40, None), (32, 40, SOFT_CAP)],
    ids=["one-partition", "split-k", "split-k-window", "split-k-window-softcap"],
)
def test_paged_decode_attention(device, dtype, heads, partition_size, sliding_window, soft_cap):
    num_heads, num_kv_heads, head_dim = heads
    scale = head_dim**-0.5
    # Lengths 1, block multiples (16, 64) and 100 = four 32-token partitions, the last partial.
    seq_lens = [1, 16, 37, 100, 64]
    key_cache, value_cache = _caches(num_kv_heads, head_dim, dtype, device)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    tables, lens = _block_tables(seq_lens, device), _int32(seq_lens, device)
    actual = triton_kernels.paged_decode_attention_triton(
        query, key_cache, value_cache, tables, lens, scale, max_seq_len=max(seq_lens),
        sliding_window=sliding_window, partition_size=partition_size, soft_cap=soft_cap,
    )
    expected = paged_decode_attention_reference(
        query, key_cache, value_cache, tables, lens, scale, sliding_window, soft_cap
    )
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [*DTYPES, BF16])
@pytest.mark.parametrize("heads", HEAD_SHAPES)
@pytest.mark.parametrize(
    ("sliding_window", "soft_cap"), [(None, None), (20, None), (20, SOFT_CAP)],
    ids=["causal", "window", "window-softcap"],
)
def test_paged_prefill_attention(device, dtype, heads, sliding_window, soft_cap):
    num_heads, num_kv_heads, head_dim = heads
    scale = head_dim**-0.5
    # (context, new tokens): whole prompts, chunks after a context of a block multiple and not,
    # a single new token, and a prompt longer than one tile of the MHA layout (64 tokens).
    pieces = [(0, 17), (32, 5), (5, 1), (16, 40), (0, 70)]
    context_lens = [context for context, _ in pieces]
    query_lens = [new for _, new in pieces]
    starts = [0]
    for new in query_lens:
        starts.append(starts[-1] + new)
    key_cache, value_cache = _caches(num_kv_heads, head_dim, dtype, device)
    query = torch.randn(starts[-1], num_heads, head_dim, device=device).to(dtype)
    seq_lens = [context + new for context, new in pieces]
    tables = _block_tables(seq_lens, device)
    query_start_loc, contexts = _int32(starts, device), _int32(context_lens, device)
    tiles = triton_kernels.PrefillTiles.build(
        list(range(len(pieces))), query_lens,
        triton_kernels.tokens_per_tile(num_heads, num_kv_heads), device,
    )
    actual = triton_kernels.paged_prefill_attention_triton(
        query, key_cache, value_cache, tables, query_start_loc, contexts, scale, tiles,
        sliding_window=sliding_window, soft_cap=soft_cap,
    )
    expected = paged_prefill_attention_reference(
        query, key_cache, value_cache, tables, query_start_loc, contexts, scale, sliding_window,
        soft_cap,
    )
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def test_soft_cap_changes_the_reference():
    """The capped cases above would pass for kernels that ignore the cap if it changed nothing."""
    cpu = torch.device("cpu")
    key_cache, value_cache = _caches(2, 64, torch.float32, cpu)
    query = torch.randn(3, 4, 64)
    tables, lens = _block_tables([40, 7, 90], cpu), _int32([40, 7, 90], cpu)
    capped, plain = (
        paged_decode_attention_reference(query, key_cache, value_cache, tables, lens, 0.125,
                                         soft_cap=soft_cap)
        for soft_cap in (SOFT_CAP, None)
    )
    assert (capped - plain).abs().max() > 0.05


def test_kernels_compile_for_nvidia_gpus():
    """Every kernel variant compiles to a cubin for sm_80 and sm_90 (no GPU needed; it runs in
    its own process, since this one interprets kernels)."""
    _run_compile_script()


def test_compiled_variants_do_not_follow_the_longest_sequence():
    """Twelve steps whose longest sequence runs from 100 to 5,000 tokens compile each kernel a
    bounded number of times (13 compiles before lengths stopped being specialized on): one
    variant of the store and prefill kernels, two of decode (split-K or not), and one merge per
    power of two of partitions (2, 4, 8, 16 here: at most 9 up to a 128k context)."""
    counts = json.loads(_run_compile_script("--count-variants").splitlines()[-1])
    assert counts == {
        "_decode_kernel": 2, "_merge_partitions_kernel": 4, "_prefill_kernel": 1,
        "_store_kv_kernel": 1,
    }


def _run_compile_script(*args: str) -> str:
    """Run compile_kernels_for_cuda.py in a process that compiles kernels; its stdout."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(COMPILE_SCRIPT), *args], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return result.stdout
