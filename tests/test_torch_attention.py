"""The torch attention backend against the per-sequence references of pagoda.kernels, for a step
mixing prefills with decodes that share leading blocks (attended to once, then merged with each
decode's own blocks) and decodes that share nothing."""

from __future__ import annotations

import pytest
import torch
from batch_layouts import layout_from_pieces

from pagoda.backend.attention import BatchLayout, TorchAttentionBackend
from pagoda.kernels import paged_decode_attention_reference, paged_prefill_attention_reference

BLOCK_SIZE = 16
NUM_BLOCKS = 64
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 32


def _step() -> tuple[BatchLayout, list[int]]:
    """(layout, indices of its decodes). Tables are built from a shuffled pool of block ids; a
    sequence's last block, where its new token goes, is always its own."""
    ids = iter(torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3)).tolist())

    def fresh(count: int) -> list[int]:
        return [next(ids) for _ in range(count)]

    samples_prompt = fresh(3)  # three samples of one request
    beams_history = fresh(4)  # beams that share 4 blocks, and one that left after 2
    cached_prefix = fresh(2)  # a prefix-cache hit, also fed by a prefill chunk this step
    pieces = [  # (table, tokens before this step, tokens this step)
        (samples_prompt + fresh(1), 3 * BLOCK_SIZE, 1),  # first token of its own block
        (samples_prompt + fresh(1), 3 * BLOCK_SIZE + 7, 1),
        (fresh(2), 20, 1),  # shares nothing
        (samples_prompt + fresh(2), 4 * BLOCK_SIZE + 15, 1),  # a full block of its own, and more
        (cached_prefix + fresh(2), 2 * BLOCK_SIZE, 20),  # a prefill chunk over the cached prefix
        (beams_history + fresh(1), 4 * BLOCK_SIZE + 3, 1),
        (beams_history[:2] + fresh(3), 4 * BLOCK_SIZE + 9, 1),
        (beams_history + fresh(1), 4 * BLOCK_SIZE + 11, 1),
        (fresh(1), 5, 1),  # shorter than a block
        (fresh(3), 0, 37),  # a whole prompt
        (cached_prefix + fresh(1), 2 * BLOCK_SIZE + 2, 1),
    ]
    layout = layout_from_pieces(pieces, BLOCK_SIZE)
    return layout, [i for i, (_, _, new) in enumerate(pieces) if new == 1]


def test_decodes_sharing_leading_blocks_are_found_with_how_many_they_share():
    layout, _ = _step()
    metadata = TorchAttentionBackend().prepare(layout, torch.device("cpu"))
    shared = metadata.for_window(None).shared_prefixes
    sets = {
        tuple(rows[member].tolist()): int((bias[0, 0] == 0).sum()) // BLOCK_SIZE
        for rows, member, bias in zip(shared.rows, shared.is_member, shared.bias)
    }
    # Indices among the step's decodes (the prefill chunk is not one): the samples share their
    # prompt's 3 blocks, the beams the 2 blocks all three still have; the decode on the cached
    # prefix has no other decode to share it with.
    assert sets == {(0, 1, 3): 3, (4, 5, 6): 2}


@pytest.mark.parametrize(
    ("sliding_window", "soft_cap"), [(None, None), (40, None), (None, 1.5), (40, 1.5)],
    ids=["global", "window", "global-softcap", "window-softcap"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_mixed_step_matches_the_per_sequence_references(dtype, sliding_window, soft_cap):
    """Soft-capping on global attention goes through the cascade (its unfused log-sum-exp)."""
    torch.manual_seed(0)
    layout, decodes = _step()
    num_tokens = layout.query_start_loc[-1]
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=dtype)
    key, value = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    caches = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    key_cache, value_cache = caches[0].clone(), caches[1].clone()
    backend = TorchAttentionBackend()
    metadata = backend.prepare(layout, torch.device("cpu"))
    assert (metadata.for_window(sliding_window).shared_prefixes is None) == (
        sliding_window is not None
    )
    output = backend.forward(query, key, value, key_cache, value_cache, metadata, HEAD_DIM**-0.5,
                             sliding_window=sliding_window, soft_cap=soft_cap)
    expected, expected_decodes = _references(
        query, key_cache, value_cache, layout, decodes, sliding_window, soft_cap
    )
    # Half precision: the plain path runs SDPA in float16, the references in float32.
    tolerance = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-3,
                                                                            "rtol": 1e-2}
    torch.testing.assert_close(output, expected, **tolerance)
    rows = torch.tensor(layout.query_start_loc)[decodes]
    torch.testing.assert_close(output[rows], expected_decodes, **tolerance)


def test_layers_with_different_windows_share_one_step_metadata():
    """Gemma's layers alternate between a sliding window and global attention: one metadata
    serves both, each window's masks built once, at the first layer that uses it."""
    torch.manual_seed(0)
    layout, decodes = _step()
    num_tokens = layout.query_start_loc[-1]
    backend = TorchAttentionBackend()
    metadata = backend.prepare(layout, torch.device("cpu"))
    caches = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    for sliding_window in (12, None, 12, None):  # four layers, each with its own cache
        query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM)
        key, value = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM)
        key_cache, value_cache = caches[0].clone(), caches[1].clone()
        output = backend.forward(query, key, value, key_cache, value_cache, metadata,
                                 HEAD_DIM**-0.5, sliding_window=sliding_window)
        expected, _ = _references(query, key_cache, value_cache, layout, decodes,
                                  sliding_window, None)
        torch.testing.assert_close(output, expected, atol=2e-5, rtol=1e-4)
    assert metadata.for_window(12) is metadata.for_window(12)
    assert set(metadata._masks) == {12, None}


def _references(query, key_cache, value_cache, layout, decodes, sliding_window, soft_cap):
    """The whole step by the prefill reference, and the decodes by the decode reference."""
    width = max(len(table) for table in layout.block_tables)
    tables = torch.tensor([table + [0] * (width - len(table)) for table in layout.block_tables])
    starts = torch.tensor(layout.query_start_loc)
    expected = paged_prefill_attention_reference(
        query, key_cache, value_cache, tables, starts, torch.tensor(layout.context_lens),
        HEAD_DIM**-0.5, sliding_window, soft_cap,
    )
    rows = starts[decodes]
    expected_decodes = paged_decode_attention_reference(
        query[rows], key_cache, value_cache, tables[decodes],
        torch.tensor(layout.seq_lens)[decodes], HEAD_DIM**-0.5, sliding_window, soft_cap,
    )
    return expected, expected_decodes


def test_attention_with_log_sum_exp_fused_on_cpu_and_unfused_elsewhere_agree():
    from pagoda.backend.attention.cascade import (
        additive_mask,
        attend_with_lse,
        attend_with_lse_unfused,
    )

    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, NUM_KV_HEADS, 5, HEAD_DIM, generator=generator)
    # Laid out as gather_blocks leaves them: [batch, keys, heads, dim] storage, viewed heads first.
    keys, values = torch.randn(2, 3, 40, NUM_KV_HEADS, HEAD_DIM, generator=generator).transpose(2, 3)
    visible = torch.arange(40)[None, None, None, :] < torch.tensor([40, 17, 1])[:, None, None, None]
    scale = HEAD_DIM**-0.5
    scores = (query @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ values, torch.logsumexp(scores, dim=-1))
    for attend in (attend_with_lse, attend_with_lse_unfused):
        output, lse = attend(query, keys, values, additive_mask(visible), scale)
        torch.testing.assert_close(output, expected[0])
        torch.testing.assert_close(lse.view_as(expected[1]), expected[1])
