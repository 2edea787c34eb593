"""BlockManager: block tables, prefix-cache matching, stats and invariant checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pagoda.backend.kv.block_manager import BlockManager, KVStats

BLOCK_SIZE = 16


@dataclass
class FakeSeq:
    """The three fields the block manager reads (its SequenceTokens protocol)."""

    seq_id: int
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0


def free_ids(manager: BlockManager) -> list[int]:
    return [block.block_id for block in manager.pool.free_queue]


def ref_counts(manager: BlockManager, seq_id: int) -> list[int]:
    return [block.ref_count for block in manager.block_tables[seq_id]]


def run_and_cache(manager: BlockManager, seq: FakeSeq) -> None:
    """What the engine does for a whole prompt: match, allocate, compute, publish."""
    seq.num_computed_tokens = manager.match_prefix(seq)
    assert manager.allocate_slots(seq, len(seq.token_ids) - seq.num_computed_tokens)
    seq.num_computed_tokens = len(seq.token_ids)
    manager.cache_computed_blocks(seq)
    manager.check_invariants()


# -- allocation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks"), [(1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3), (160, 10)]
)
def test_allocate_slots_grows_the_table_to_ceil_tokens_over_block_size(
    num_tokens: int, num_blocks: int
) -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(num_tokens)))
    assert manager.num_new_blocks_needed(seq, num_tokens) == num_blocks
    assert manager.allocate_slots(seq, num_tokens)
    assert manager.block_ids(0) == list(range(num_blocks))
    assert ref_counts(manager, 0) == [1] * num_blocks
    assert manager.num_free_blocks == 10 - num_blocks
    manager.check_invariants()


def test_allocate_slots_grows_incrementally_with_computed_tokens() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(40)))
    assert manager.allocate_slots(seq, 10)
    assert manager.block_ids(0) == [0]
    seq.num_computed_tokens = 10
    assert manager.num_new_blocks_needed(seq, 6) == 0
    assert manager.allocate_slots(seq, 6)  # fills block 0 exactly
    assert manager.block_ids(0) == [0]
    seq.num_computed_tokens = 16
    assert manager.num_new_blocks_needed(seq, 17) == 2
    assert manager.allocate_slots(seq, 17)  # 33 tokens
    assert manager.block_ids(0) == [0, 1, 2]
    seq.num_computed_tokens = 33
    # Zero new tokens needs no block.
    assert manager.allocate_slots(seq, 0)
    assert manager.block_ids(0) == [0, 1, 2]
    manager.check_invariants()


def test_allocate_slots_returns_false_and_changes_nothing_when_short() -> None:
    manager = BlockManager(3, BLOCK_SIZE, enable_prefix_caching=False)
    first = FakeSeq(0, list(range(20)))
    assert manager.allocate_slots(first, 20)
    assert manager.block_ids(0) == [0, 1]

    second = FakeSeq(1, list(range(20)))
    assert not manager.allocate_slots(second, 20)
    assert 1 not in manager.block_tables
    assert free_ids(manager) == [2]

    # Short when growing an existing table, too.
    first.num_computed_tokens = 20
    assert not manager.allocate_slots(first, 29)  # 49 tokens: 4 blocks, 1 free
    assert manager.block_ids(0) == [0, 1]
    assert free_ids(manager) == [2]
    assert manager.allocate_slots(first, 28)  # 48 tokens: exactly 3 blocks
    assert manager.block_ids(0) == [0, 1, 2]
    assert manager.num_free_blocks == 0
    manager.check_invariants()


def test_free_releases_the_table_last_block_first() -> None:
    manager = BlockManager(6, BLOCK_SIZE, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(48)))
    assert manager.allocate_slots(seq, 48)
    manager.free(seq)
    assert 0 not in manager.block_tables
    assert free_ids(manager) == [3, 4, 5, 2, 1, 0]
    manager.check_invariants()
    # Freeing a sequence that holds nothing is a no-op.
    manager.free(seq)
    manager.free(FakeSeq(99))
    assert manager.pool.num_used_blocks == 0
    manager.check_invariants()


# -- prefix caching ----------------------------------------------------------------------------


def test_match_prefix_with_caching_off_returns_zero() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    first = FakeSeq(0, list(range(56)))
    run_and_cache(manager, first)
    assert manager.pool.cached == {}
    manager.free(first)

    second = FakeSeq(1, list(range(56)))
    assert manager.match_prefix(second) == 0
    assert manager.block_tables[1] == []
    assert manager.prefix_cache_queries == 0
    assert manager.prefix_cache_hits == 0
    manager.check_invariants()


def test_match_prefix_is_only_for_fresh_sequences() -> None:
    manager = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=True)
    seq = FakeSeq(0, list(range(20)))
    assert manager.allocate_slots(seq, 20)
    with pytest.raises(AssertionError, match="fresh"):
        manager.match_prefix(seq)


@pytest.fixture
def cached_manager() -> BlockManager:
    """A first sequence of 56 tokens (3 full blocks + 8 tokens) computed, cached and freed."""
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    first = FakeSeq(0, list(range(56)))
    assert manager.match_prefix(first) == 0
    assert manager.allocate_slots(first, 56)
    assert manager.block_ids(0) == [0, 1, 2, 3]
    first.num_computed_tokens = 56
    manager.cache_computed_blocks(first)
    # Only the 3 full blocks are published; the partial one is not.
    assert sorted(block.block_id for block in manager.pool.cached.values()) == [0, 1, 2]
    assert manager.pool.blocks[3].key is None
    manager.free(first)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    manager.check_invariants()
    return manager


def test_prefix_hit_attaches_the_matching_full_blocks(cached_manager: BlockManager) -> None:
    manager = cached_manager
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits
    # Same first 40 tokens, then different ones.
    second = FakeSeq(1, list(range(40)) + [1000 + i for i in range(10)])
    assert manager.match_prefix(second) == 32
    assert manager.block_ids(1) == [0, 1]
    assert ref_counts(manager, 1) == [1, 1]
    # Blocks 0 and 1 left the free queue wherever they were; block 2 is still cached.
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 3, 2]
    assert manager.pool.blocks[2].key is not None
    # Nothing is counted until the scheduler commits the match.
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (queries, hits)
    second.num_computed_tokens = 32
    manager.record_prefix_match(second)
    # (50 - 1) // 16 = 3 blocks looked up: two hits, then a miss.
    assert manager.prefix_cache_queries - queries == 3
    assert manager.prefix_cache_hits - hits == 2
    manager.check_invariants()

    assert manager.allocate_slots(second, 18)
    assert manager.block_ids(1) == [0, 1, 4, 5]
    manager.check_invariants()


def test_prefix_hit_on_blocks_in_use_shares_them(cached_manager: BlockManager) -> None:
    manager = cached_manager
    second = FakeSeq(1, list(range(40)))
    assert manager.match_prefix(second) == 32
    third = FakeSeq(2, list(range(40)))
    assert manager.match_prefix(third) == 32
    assert manager.block_ids(2) == [0, 1]
    assert ref_counts(manager, 2) == [2, 2]
    manager.check_invariants()
    manager.free(second)
    assert ref_counts(manager, 2) == [1, 1]
    manager.free(third)
    assert free_ids(manager) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    manager.check_invariants()


def test_whole_cached_prompt_leaves_its_last_token_to_compute(
    cached_manager: BlockManager,
) -> None:
    manager = cached_manager
    # 48 tokens are all cached (3 blocks), but the last one must be fed to the model.
    seq = FakeSeq(1, list(range(48)))
    assert manager.match_prefix(seq) == 32
    assert manager.block_ids(1) == [0, 1]
    manager.check_invariants()


def test_prompt_of_exactly_two_blocks_matches_only_one(cached_manager: BlockManager) -> None:
    manager = cached_manager
    seq = FakeSeq(1, list(range(32)))
    assert manager.match_prefix(seq) == 16
    assert manager.block_ids(1) == [0]
    assert ref_counts(manager, 1) == [1]
    manager.check_invariants()


def test_prompt_one_past_a_block_boundary_matches_it(cached_manager: BlockManager) -> None:
    manager = cached_manager
    seq = FakeSeq(1, list(range(33)))
    assert manager.match_prefix(seq) == 32
    assert manager.block_ids(1) == [0, 1]


@pytest.mark.parametrize(
    ("diverge_at", "num_matched_tokens"), [(0, 0), (15, 0), (16, 16), (31, 16), (32, 32)]
)
def test_diverging_tokens_stop_the_match(
    cached_manager: BlockManager, diverge_at: int, num_matched_tokens: int
) -> None:
    manager = cached_manager
    tokens = list(range(56))
    tokens[diverge_at] = 9999
    seq = FakeSeq(1, tokens)
    assert manager.match_prefix(seq) == num_matched_tokens
    assert manager.block_ids(1) == list(range(num_matched_tokens // BLOCK_SIZE))
    manager.check_invariants()


def test_a_later_block_with_the_same_tokens_needs_the_same_parent() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    first = FakeSeq(0, [1] * 16 + [2] * 16 + [3])
    run_and_cache(manager, first)
    manager.free(first)
    # Block 1 holds the same tokens, but it follows a different block 0.
    second = FakeSeq(1, [7] * 16 + [2] * 16 + [3])
    assert manager.match_prefix(second) == 0
    assert manager.block_ids(1) == []


def test_cache_computed_blocks_publishes_only_newly_full_blocks() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    seq = FakeSeq(0, list(range(50)))
    assert manager.match_prefix(seq) == 0
    assert manager.allocate_slots(seq, 20)
    seq.num_computed_tokens = 20
    manager.cache_computed_blocks(seq)
    assert [block.block_id for block in manager.pool.cached.values()] == [0]
    assert manager.allocate_slots(seq, 20)
    seq.num_computed_tokens = 40
    manager.cache_computed_blocks(seq)
    assert [block.block_id for block in manager.pool.cached.values()] == [0, 1]
    # Calling it again publishes nothing new.
    manager.cache_computed_blocks(seq)
    assert len(manager.pool.cached) == 2
    manager.check_invariants()

    # The published chain matches a prompt computed in one go.
    other = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    whole = FakeSeq(0, list(range(50)))
    run_and_cache(other, whole)
    assert set(other.pool.cached) >= set(manager.pool.cached)


def test_cache_computed_blocks_with_caching_off_does_nothing() -> None:
    manager = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(40)))
    run_and_cache(manager, seq)
    assert manager.pool.cached == {}
    assert all(block.key is None for block in manager.pool.blocks)


def test_blocks_computed_twice_concurrently_keep_the_first_copy_cached() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    first = FakeSeq(0, list(range(40)))
    second = FakeSeq(1, list(range(40)))
    # Both admitted before either is computed: no hit for the second.
    assert manager.match_prefix(first) == 0
    assert manager.match_prefix(second) == 0
    assert manager.allocate_slots(first, 40)
    assert manager.allocate_slots(second, 40)
    assert manager.block_ids(0) == [0, 1, 2]
    assert manager.block_ids(1) == [3, 4, 5]
    first.num_computed_tokens = second.num_computed_tokens = 40
    manager.cache_computed_blocks(first)
    manager.cache_computed_blocks(second)
    assert sorted(block.block_id for block in manager.pool.cached.values()) == [0, 1]
    manager.check_invariants()

    manager.free(second)
    manager.free(first)
    assert free_ids(manager) == [6, 7, 8, 9, 5, 4, 3, 2, 1, 0]
    third = FakeSeq(2, list(range(40)))
    assert manager.match_prefix(third) == 32
    assert manager.block_ids(2) == [0, 1]
    manager.check_invariants()


def test_evicted_prefix_blocks_no_longer_match(cached_manager: BlockManager) -> None:
    manager = cached_manager
    # Free queue: 4 5 6 7 8 9 3 2 1 0. Taking 8 blocks evicts cached block 2 only.
    filler = FakeSeq(1, list(range(5000, 5000 + 8 * BLOCK_SIZE)))
    assert manager.allocate_slots(filler, 8 * BLOCK_SIZE)
    assert manager.block_ids(1) == [4, 5, 6, 7, 8, 9, 3, 2]
    assert manager.pool.num_evictions == 1
    manager.free(filler)

    seq = FakeSeq(2, list(range(56)))
    assert manager.match_prefix(seq) == 32
    assert manager.block_ids(2) == [0, 1]
    manager.check_invariants()


def test_a_recomputed_sequence_matches_its_own_cached_blocks() -> None:
    """Preemption frees a sequence; with caching on, its re-admission hits its own blocks."""
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    seq = FakeSeq(0, list(range(40)))
    run_and_cache(manager, seq)
    assert manager.block_ids(0) == [0, 1, 2]
    manager.free(seq)
    seq.num_computed_tokens = 0
    assert manager.match_prefix(seq) == 32
    assert manager.block_ids(0) == [0, 1]
    manager.check_invariants()


def test_fork_of_a_prefix_shares_only_the_blocks_holding_it() -> None:
    """A resumed group's samples fork the common history: 20 of the parent's 40 tokens."""
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    parent = FakeSeq(0, list(range(40)))
    assert manager.allocate_slots(parent, 40)
    parent.num_computed_tokens = 40
    child = FakeSeq(1, list(range(20)) + [99] * 5, num_computed_tokens=20)
    manager.fork(parent, child, num_tokens=20)
    assert manager.block_ids(1) == [0, 1]
    assert ref_counts(manager, 0) == [2, 2, 1]
    # The child's token 20 goes into block 1, which also holds the parent's tokens 20-31.
    assert manager.allocate_slots(child, 5)
    assert manager.block_ids(1) == [0, 3]
    assert manager.take_block_copies() == [(1, 3)]
    assert ref_counts(manager, 0) == [2, 1, 1]
    manager.check_invariants()


def test_fork_of_a_block_aligned_prefix_copies_nothing() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=False)
    parent = FakeSeq(0, list(range(40)))
    assert manager.allocate_slots(parent, 40)
    parent.num_computed_tokens = 40
    child = FakeSeq(1, list(range(32)) + [99] * 3, num_computed_tokens=32)
    manager.fork(parent, child, num_tokens=32)
    assert manager.allocate_slots(child, 3)
    assert manager.block_ids(1) == [0, 1, 3]
    assert manager.take_block_copies() == []
    manager.check_invariants()


# -- stats and invariants ----------------------------------------------------------------------


def test_stats_of_an_empty_manager() -> None:
    manager = BlockManager(8, 4, enable_prefix_caching=False)
    stats = manager.stats([])
    assert stats == KVStats(num_blocks=8, num_used_blocks=0, num_tokens=0, block_size=4)
    assert stats.waste == 0.0


def test_stats_counts_filled_slots_of_live_tables() -> None:
    manager = BlockManager(8, 4, enable_prefix_caching=False)
    first = FakeSeq(0, list(range(10)))
    assert manager.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    second = FakeSeq(1, list(range(5)))
    assert manager.allocate_slots(second, 5)
    second.num_computed_tokens = 5
    stats = manager.stats([first, second])
    assert stats.num_used_blocks == 5
    assert stats.num_tokens == 15
    assert stats.waste == pytest.approx(1 - 15 / 20)

    # Allocated but not yet computed slots are empty.
    second.num_computed_tokens = 3
    stats = manager.stats([first, second])
    assert stats.num_tokens == 13
    assert stats.waste == pytest.approx(1 - 13 / 20)


def test_stats_counts_shared_blocks_once() -> None:
    manager = BlockManager(8, 4, enable_prefix_caching=True)
    first = FakeSeq(0, list(range(12)))
    run_and_cache(manager, first)
    second = FakeSeq(1, list(range(8)) + [100, 101, 102])
    second.num_computed_tokens = manager.match_prefix(second)
    assert second.num_computed_tokens == 8
    assert manager.allocate_slots(second, 3)
    assert manager.block_ids(1) == [0, 1, 3]
    manager.check_invariants()

    stats = manager.stats([first, second])
    assert stats.num_used_blocks == 4
    assert stats.num_tokens == 12  # blocks 0 and 1 once, block 2 full, block 3 not computed
    assert stats.waste == pytest.approx(0.25)

    second.num_computed_tokens = 11
    stats = manager.stats([first, second])
    assert stats.num_tokens == 15
    assert stats.waste == pytest.approx(1 / 16)


def test_check_invariants_catches_a_ref_count_mismatch() -> None:
    manager = BlockManager(4, 4, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(8)))
    assert manager.allocate_slots(seq, 8)
    manager.check_invariants()
    manager.pool.share(manager.block_tables[0][1])  # a reference no table holds
    with pytest.raises(AssertionError, match="block 1: ref_count 2, held by 1 tables"):
        manager.check_invariants()


def test_check_invariants_catches_a_block_missing_from_its_table() -> None:
    manager = BlockManager(4, 4, enable_prefix_caching=False)
    seq = FakeSeq(0, list(range(8)))
    assert manager.allocate_slots(seq, 8)
    manager.block_tables[0].pop()
    with pytest.raises(AssertionError, match="block 1: ref_count 1, held by 0 tables"):
        manager.check_invariants()
