"""Serving-size cases on CUDA (gpu marker; skipped without it): the Triton kernels and both
attention backends against the torch references of pagoda.kernels, in bfloat16 and float16, for
head_dim 64, 80 and 128, GQA and MHA, with and without a sliding window, 32k-token contexts,
batches of 256 decodes, and decodes sharing prefixes (the torch backend's cascade path).

test_kernels.py covers the same contracts at interpreter sizes on CPU.
"""

from __future__ import annotations

import pytest
import torch
import triton_devices
from batch_layouts import Piece, layout_from_pieces

from pagoda.backend.attention import BatchLayout, TorchAttentionBackend
from pagoda.kernels import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
    store_kv_reference,
)

pytestmark = pytest.mark.gpu
triton_kernels = pytest.importorskip("pagoda.kernels.triton")
triton_backend = pytest.importorskip("pagoda.backend.attention.triton_backend")

BLOCK_SIZE = 16
LONG_CONTEXT = 32768
NUM_DECODES = 256
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# (num_heads, num_kv_heads, head_dim): Llama 3 8B, Llama 2 7B (MHA: the widest store rows),
# Llama 3.2 1B, and an MHA head_dim that is not a power of two (Phi-2).
HEAD_SHAPES = [
    pytest.param((32, 8, 128), id="gqa-128"),
    pytest.param((32, 32, 128), id="mha-128"),
    pytest.param((32, 8, 64), id="gqa-64"),
    pytest.param((32, 32, 80), id="mha-80"),
]
WINDOWS = [pytest.param(None, id="causal"), pytest.param(4096, id="window-4096")]
# Half-precision outputs, and half-precision probabilities in the kernels' second matrix product.
TOLERANCES = {
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 4e-3, "rtol": 1e-2},
}


@pytest.fixture
def device() -> torch.device:
    torch.manual_seed(0)
    return triton_devices.require("cuda")


def _caches(num_blocks: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return (torch.randn(shape, device=device, dtype=dtype),
            torch.randn(shape, device=device, dtype=dtype))


def _tables(seq_lens: list[int]) -> tuple[list[list[int]], int]:
    """Each sequence's blocks drawn from a shuffled cache; the tables and the cache's size."""
    needed = [-(-seq_len // BLOCK_SIZE) for seq_len in seq_lens]
    ids = torch.randperm(sum(needed)).tolist()
    tables, taken = [], 0
    for count in needed:
        tables.append(ids[taken : taken + count])
        taken += count
    return tables, taken


def _padded(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables],
                        dtype=torch.int32, device=device)


def _decode_lens() -> list[int]:
    """256 contexts: mostly up to 4k, with 32k, one short of it, just past 16k, and 1."""
    lens = torch.randint(1, 4097, (NUM_DECODES,)).tolist()
    lens[:4] = [LONG_CONTEXT, LONG_CONTEXT - 1, 16385, 1]
    return lens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(8, 128), (32, 128), (64, 128), (32, 80)])
def test_store_kv_at_serving_sizes(device, dtype, num_kv_heads, head_dim):
    num_tokens = 8192  # a full prefill step; every 10th row is padding (slot -1)
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=device, dtype=dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    num_blocks = 2 * num_tokens // BLOCK_SIZE
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=device)[:num_tokens]
    slots[::10] = -1
    expected = _caches(num_blocks, num_kv_heads, head_dim, dtype, device)
    actual = tuple(cache.clone() for cache in expected)
    store_kv_reference(key, value, *expected, slots)
    triton_kernels.store_kv_triton(key, value, *actual, slots)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEAD_SHAPES)
@pytest.mark.parametrize("sliding_window", WINDOWS)
def test_decode_batch_256_up_to_32k(device, dtype, heads, sliding_window):
    num_heads, num_kv_heads, head_dim = heads
    seq_lens = _decode_lens()
    tables, num_blocks = _tables(seq_lens)
    key_cache, value_cache = _caches(num_blocks, num_kv_heads, head_dim, dtype, device)
    query = torch.randn(NUM_DECODES, num_heads, head_dim, device=device, dtype=dtype)
    block_tables = _padded(tables, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    actual = triton_kernels.paged_decode_attention_triton(
        query, key_cache, value_cache, block_tables, lens, head_dim**-0.5,
        max_seq_len=max(seq_lens), sliding_window=sliding_window,
    )
    expected = paged_decode_attention_reference(
        query, key_cache, value_cache, block_tables, lens, head_dim**-0.5, sliding_window
    )
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEAD_SHAPES)
@pytest.mark.parametrize("sliding_window", WINDOWS)
def test_prefill_chunks_over_a_32k_context(device, dtype, heads, sliding_window):
    num_heads, num_kv_heads, head_dim = heads
    # (context, new tokens): a chunk ending at 32k, whole prompts, a chunk over a short context.
    pieces = [(LONG_CONTEXT - 512, 512), (0, 2048), (0, 1), (100, 300), (4095, 1000)]
    seq_lens = [context + new for context, new in pieces]
    tables, num_blocks = _tables(seq_lens)
    key_cache, value_cache = _caches(num_blocks, num_kv_heads, head_dim, dtype, device)
    starts = [0]
    for _, new in pieces:
        starts.append(starts[-1] + new)
    query = torch.randn(starts[-1], num_heads, head_dim, device=device, dtype=dtype)
    block_tables = _padded(tables, device)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    contexts = torch.tensor([context for context, _ in pieces], dtype=torch.int32, device=device)
    tiles = triton_kernels.PrefillTiles.build(
        list(range(len(pieces))), [new for _, new in pieces],
        triton_kernels.tokens_per_tile(num_heads, num_kv_heads), device,
    )
    actual = triton_kernels.paged_prefill_attention_triton(
        query, key_cache, value_cache, block_tables, query_start_loc, contexts, head_dim**-0.5,
        tiles, sliding_window=sliding_window,
    )
    expected = paged_prefill_attention_reference(
        query, key_cache, value_cache, block_tables, query_start_loc, contexts, head_dim**-0.5,
        sliding_window,
    )
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def _shared_prefix_step(device: torch.device) -> tuple[BatchLayout, int]:
    """256 decodes in groups sharing leading blocks (16 groups of 15 over a 2k prefix, 4 over a
    32k one, 12 sharing nothing) and a prefill chunk; each decode's last block is its own. The
    layout and the size of the cache its blocks are drawn from."""
    num_blocks = 16384  # ~12k used
    next_block = iter(torch.randperm(num_blocks).tolist())

    def fresh(count: int) -> list[int]:
        return [next(next_block) for _ in range(count)]

    pieces: list[Piece] = []
    prefixes = [(fresh(128), 15) for _ in range(16)] + [(fresh(LONG_CONTEXT // BLOCK_SIZE), 4)]
    for prefix, members in prefixes:
        for _ in range(members):
            own = int(torch.randint(1, 300, ()))
            context = len(prefix) * BLOCK_SIZE + own - 1
            pieces.append((prefix + fresh(-(-own // BLOCK_SIZE)), context, 1))
    while len(pieces) < NUM_DECODES:
        context = int(torch.randint(1, 4096, ()))
        pieces.append((fresh(context // BLOCK_SIZE + 1), context, 1))
    pieces.append((fresh(64), 512, 512))
    return layout_from_pieces(pieces, BLOCK_SIZE, device), num_blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [HEAD_SHAPES[0], HEAD_SHAPES[3]])
def test_backends_on_decodes_sharing_prefixes(device, dtype, heads):
    """The torch backend attends to shared prefixes once (cascade) and merges; the Triton one
    reads every table whole. Both against the per-sequence references, after the same store."""
    num_heads, num_kv_heads, head_dim = heads
    layout, num_blocks = _shared_prefix_step(device)
    caches = _caches(num_blocks, num_kv_heads, head_dim, dtype, device)
    num_tokens = layout.query_start_loc[-1]
    query = torch.randn(num_tokens, num_heads, head_dim, device=device, dtype=dtype)
    key, value = torch.randn(2, num_tokens, num_kv_heads, head_dim, device=device, dtype=dtype)
    expected_caches = tuple(cache.clone() for cache in caches)
    store_kv_reference(key, value, *expected_caches, layout.slot_mapping)
    block_tables = _padded(layout.block_tables, device)
    starts = torch.tensor(layout.query_start_loc, dtype=torch.int32, device=device)
    contexts = torch.tensor(layout.context_lens, dtype=torch.int32, device=device)
    expected = paged_prefill_attention_reference(
        query, *expected_caches, block_tables, starts, contexts, head_dim**-0.5
    )
    torch_backend = TorchAttentionBackend()
    assert torch_backend.prepare(layout, device).for_window(None).shared_prefixes is not None
    for backend in (torch_backend, triton_backend.TritonAttentionBackend()):
        key_cache, value_cache = (cache.clone() for cache in caches)
        metadata = backend.prepare(layout, device)
        actual = backend.forward(query, key, value, key_cache, value_cache, metadata,
                                 head_dim**-0.5)
        assert torch.equal(key_cache, expected_caches[0])
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def test_decode_partials_past_2_31_elements(device):
    """4608 decodes next to a 32k context: the split-K partial results hold 4608 x 64 heads x 64
    partitions x 128 = 2.4G floats, so the last sequences' offsets only fit in int64."""
    num_seqs, num_heads, num_kv_heads, head_dim = 4608, 64, 8, 128
    seq_lens = [1 + index % 200 for index in range(num_seqs - 1)] + [LONG_CONTEXT]
    tables, num_blocks = _tables(seq_lens)
    key_cache, value_cache = _caches(num_blocks, num_kv_heads, head_dim, torch.float16, device)
    query = torch.randn(num_seqs, num_heads, head_dim, device=device, dtype=torch.float16)
    block_tables = _padded(tables, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    actual = triton_kernels.paged_decode_attention_triton(
        query, key_cache, value_cache, block_tables, lens, head_dim**-0.5,
        max_seq_len=LONG_CONTEXT,
    )
    rows = torch.tensor([0, 1, num_seqs // 2, *range(num_seqs - 16, num_seqs)], device=device)
    expected = paged_decode_attention_reference(
        query[rows], key_cache, value_cache, block_tables[rows], lens[rows], head_dim**-0.5
    )
    torch.testing.assert_close(actual[rows], expected, **TOLERANCES[torch.float16])
