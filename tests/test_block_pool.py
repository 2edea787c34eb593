"""BlockPool, FreeBlockQueue and BlockKey: exact block ids, ref counts, queue order, evictions."""

from __future__ import annotations

import pytest

from pagoda.backend.kv.block_pool import BlockKey, BlockPool, FreeBlockQueue, KVBlock


def free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_queue]


def queue_ids(queue: FreeBlockQueue) -> list[int]:
    return [block.block_id for block in queue]


def chain_keys(num_blocks: int, block_size: int = 4) -> list[BlockKey]:
    """Keys of the first `num_blocks` full blocks of the prompt 0, 1, 2, ..."""
    keys: list[BlockKey] = []
    parent = None
    for index in range(num_blocks):
        parent = BlockKey.chain(parent, range(index * block_size, (index + 1) * block_size))
        keys.append(parent)
    return keys


# -- BlockKey ----------------------------------------------------------------------------------


def test_block_key_equal_tokens_and_parent_give_equal_keys() -> None:
    parent = BlockKey.chain(None, [1, 2, 3, 4])
    first = BlockKey.chain(parent, [5, 6, 7, 8])
    second = BlockKey.chain(parent, (5, 6, 7, 8))
    assert first == second
    assert hash(first) == hash(second)
    assert {first: "a"}[second] == "a"
    assert first.parent_hash == parent.hash
    assert first.token_ids == (5, 6, 7, 8)


def test_block_key_root_has_no_parent() -> None:
    root = BlockKey.chain(None, [1, 2])
    assert root.parent_hash is None


def test_block_key_different_parents_give_different_keys() -> None:
    parent_a = BlockKey.chain(None, [1, 2, 3, 4])
    parent_b = BlockKey.chain(None, [9, 9, 9, 9])
    child_a = BlockKey.chain(parent_a, [5, 6, 7, 8])
    child_b = BlockKey.chain(parent_b, [5, 6, 7, 8])
    assert child_a.token_ids == child_b.token_ids
    assert child_a != child_b
    # A root block and a child block with the same tokens are different too.
    assert BlockKey.chain(None, [5, 6, 7, 8]) != child_a


def test_block_key_compares_tokens_not_only_the_hash() -> None:
    """A hash collision must never make one prefix reuse another's KV."""
    first = BlockKey(parent_hash=None, token_ids=(1, 2), hash=42)
    second = BlockKey(parent_hash=None, token_ids=(3, 4), hash=42)
    assert hash(first) == hash(second) == 42
    assert first != second
    table = {first: "first", second: "second"}
    assert len(table) == 2
    assert table[first] == "first"
    assert table[second] == "second"


def test_colliding_key_does_not_hit_the_cache() -> None:
    pool = BlockPool(2, enable_caching=True)
    [block] = pool.allocate(1)
    cached_key = BlockKey(parent_hash=None, token_ids=(1, 2), hash=7)
    pool.cache(block, cached_key)
    assert pool.lookup(cached_key) is block
    assert pool.lookup(BlockKey(parent_hash=None, token_ids=(3, 4), hash=7)) is None
    assert pool.lookup(BlockKey(parent_hash=5, token_ids=(1, 2), hash=7)) is None


# -- FreeBlockQueue ----------------------------------------------------------------------------


def test_free_queue_removal_from_head_middle_and_tail() -> None:
    blocks = [KVBlock(block_id) for block_id in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue_ids(queue) == [0, 1, 2, 3, 4]
    assert len(queue) == 5

    queue.remove(blocks[0])  # head
    assert queue_ids(queue) == [1, 2, 3, 4]
    queue.remove(blocks[2])  # middle
    assert queue_ids(queue) == [1, 3, 4]
    queue.remove(blocks[4])  # tail
    assert queue_ids(queue) == [1, 3]
    assert len(queue) == 2
    for removed in (blocks[0], blocks[2], blocks[4]):
        assert removed.prev_free is None and removed.next_free is None

    # Appending after removals keeps the links right at both ends.
    queue.append(blocks[2])
    queue.append(blocks[0])
    assert queue_ids(queue) == [1, 3, 2, 0]
    assert len(queue) == 4


def test_free_queue_popleft_in_order_then_empty() -> None:
    blocks = [KVBlock(block_id) for block_id in range(3)]
    queue = FreeBlockQueue(blocks)
    assert [queue.popleft().block_id for _ in range(3)] == [0, 1, 2]
    assert len(queue) == 0
    assert queue_ids(queue) == []
    with pytest.raises(IndexError):
        queue.popleft()
    queue.append(blocks[1])
    assert queue_ids(queue) == [1]
    assert queue.popleft() is blocks[1]


def test_free_queue_remove_of_a_block_not_queued_asserts() -> None:
    queue = FreeBlockQueue([KVBlock(0)])
    outsider = KVBlock(1)
    with pytest.raises(AssertionError, match="not in the free queue"):
        queue.remove(outsider)
    assert len(queue) == 1


def test_free_queue_remove_only_element() -> None:
    block = KVBlock(0)
    queue = FreeBlockQueue([block])
    queue.remove(block)
    assert len(queue) == 0
    assert queue_ids(queue) == []
    queue.append(block)
    assert queue_ids(queue) == [0]


# -- BlockPool ---------------------------------------------------------------------------------


def test_pool_needs_a_positive_block_count() -> None:
    with pytest.raises(ValueError, match="num_kv_blocks"):
        BlockPool(0, enable_caching=False)


def test_fresh_pool_allocates_in_id_order() -> None:
    pool = BlockPool(5, enable_caching=False)
    assert free_ids(pool) == [0, 1, 2, 3, 4]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 0

    first = pool.allocate(3)
    assert [block.block_id for block in first] == [0, 1, 2]
    assert [block.ref_count for block in first] == [1, 1, 1]
    assert free_ids(pool) == [3, 4]
    assert pool.num_free_blocks == 2 and pool.num_used_blocks == 3
    pool.check_invariants()

    second = pool.allocate(2)
    assert [block.block_id for block in second] == [3, 4]
    assert pool.num_free_blocks == 0 and pool.num_used_blocks == 5
    pool.check_invariants()


def test_allocate_zero_blocks() -> None:
    pool = BlockPool(2, enable_caching=False)
    assert pool.allocate(0) == []
    assert free_ids(pool) == [0, 1]


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3, enable_caching=False)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks, 1 free"):
        pool.allocate(2)
    assert free_ids(pool) == [2]
    assert pool.num_used_blocks == 2
    pool.check_invariants()


def test_release_appends_to_the_tail_in_lru_order() -> None:
    pool = BlockPool(4, enable_caching=False)
    blocks = pool.allocate(4)
    pool.release([blocks[2]])
    pool.check_invariants()
    pool.release([blocks[0]])
    pool.check_invariants()
    pool.release([blocks[3]])
    pool.check_invariants()
    assert free_ids(pool) == [2, 0, 3]
    assert blocks[1].ref_count == 1
    # Least recently freed goes first.
    assert [block.block_id for block in pool.allocate(2)] == [2, 0]
    assert free_ids(pool) == [3]
    pool.check_invariants()


def test_release_of_a_table_in_reverse_puts_its_tail_first_for_eviction() -> None:
    pool = BlockPool(6, enable_caching=True)
    table = pool.allocate(3)
    keys = chain_keys(3)
    for block, key in zip(table, keys):
        pool.cache(block, key)
    pool.release(reversed(table))
    pool.check_invariants()
    assert free_ids(pool) == [3, 4, 5, 2, 1, 0]
    assert pool.num_evictions == 0

    # The never-used blocks go first, then the table's last block, then the one before it.
    assert [block.block_id for block in pool.allocate(3)] == [3, 4, 5]
    assert pool.num_evictions == 0
    [evicted] = pool.allocate(1)
    assert evicted.block_id == 2
    assert evicted.key is None
    assert pool.num_evictions == 1
    assert pool.lookup(keys[2]) is None
    assert pool.lookup(keys[0]) is table[0]
    assert pool.lookup(keys[1]) is table[1]
    assert free_ids(pool) == [1, 0]
    pool.check_invariants()

    [evicted] = pool.allocate(1)
    assert evicted.block_id == 1
    assert pool.num_evictions == 2
    assert set(pool.cached) == {keys[0]}
    pool.check_invariants()


def test_share_of_a_free_cached_block_removes_it_from_the_middle_of_the_queue() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    keys = chain_keys(4)
    for block, key in zip(blocks, keys):
        pool.cache(block, key)
    pool.release(reversed(blocks))
    assert free_ids(pool) == [3, 2, 1, 0]

    hit = pool.lookup(keys[1])
    assert hit is blocks[1]
    pool.share(hit)
    assert hit.ref_count == 1
    assert free_ids(pool) == [3, 2, 0]
    assert pool.num_used_blocks == 1
    pool.check_invariants()

    # Sharing a block in use only counts one more owner.
    pool.share(hit)
    assert hit.ref_count == 2
    assert free_ids(pool) == [3, 2, 0]
    pool.check_invariants()

    pool.release([hit])
    assert hit.ref_count == 1
    assert free_ids(pool) == [3, 2, 0]
    pool.check_invariants()

    # Freed again, it goes to the tail and stays cached (no eviction).
    pool.release([hit])
    assert hit.ref_count == 0
    assert free_ids(pool) == [3, 2, 0, 1]
    assert pool.lookup(keys[1]) is hit
    assert pool.num_evictions == 0
    pool.check_invariants()


def test_share_of_the_queue_head_and_tail() -> None:
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(3)
    pool.release(blocks)
    assert free_ids(pool) == [0, 1, 2]
    pool.share(blocks[0])
    assert free_ids(pool) == [1, 2]
    pool.share(blocks[2])
    assert free_ids(pool) == [1]
    pool.check_invariants()
    assert [block.block_id for block in pool.allocate(1)] == [1]
    assert pool.num_free_blocks == 0
    pool.check_invariants()


def test_eviction_removes_the_key_from_cached_and_counts() -> None:
    pool = BlockPool(3, enable_caching=True)
    blocks = pool.allocate(3)
    keys = chain_keys(2)
    pool.cache(blocks[0], keys[0])
    pool.cache(blocks[1], keys[1])
    pool.release(blocks)  # queue: 0 (cached), 1 (cached), 2 (empty)
    assert set(pool.cached) == set(keys)

    [first] = pool.allocate(1)
    assert first is blocks[0]
    assert first.key is None and first.ref_count == 1
    assert keys[0] not in pool.cached
    assert pool.lookup(keys[0]) is None
    assert pool.num_evictions == 1
    pool.check_invariants()

    [second] = pool.allocate(1)
    assert second is blocks[1]
    assert pool.cached == {}
    assert pool.num_evictions == 2

    # An empty block is reused without counting an eviction.
    [third] = pool.allocate(1)
    assert third is blocks[2]
    assert pool.num_evictions == 2
    pool.check_invariants()


def test_the_first_block_cached_under_a_key_keeps_it() -> None:
    pool = BlockPool(3, enable_caching=True)
    original, duplicate = pool.allocate(2)
    key = BlockKey.chain(None, [1, 2, 3, 4])
    pool.cache(original, key)
    pool.cache(duplicate, key)
    assert pool.cached == {key: original}
    assert original.key == key
    assert duplicate.key is None
    pool.check_invariants()

    # A block that is already cached keeps its first key.
    other_key = BlockKey.chain(None, [5, 6, 7, 8])
    pool.cache(original, other_key)
    assert original.key == key
    assert other_key not in pool.cached

    # The duplicate stays private: freed and reused without an eviction.
    pool.release([duplicate])
    assert free_ids(pool) == [2, 1]
    assert [block.block_id for block in pool.allocate(2)] == [2, 1]
    assert pool.num_evictions == 0
    assert pool.lookup(key) is original
    pool.check_invariants()


def test_caching_disabled_never_caches() -> None:
    pool = BlockPool(2, enable_caching=False)
    [block] = pool.allocate(1)
    key = BlockKey.chain(None, [1, 2])
    pool.cache(block, key)
    assert block.key is None
    assert pool.cached == {}
    assert pool.lookup(key) is None
    pool.release([block])
    pool.allocate(2)
    assert pool.num_evictions == 0


def test_double_free_asserts() -> None:
    pool = BlockPool(2, enable_caching=False)
    [block] = pool.allocate(1)
    pool.release([block])
    with pytest.raises(AssertionError, match="double free of KV block 0"):
        pool.release([block])
    # The failed release left the queue alone.
    assert free_ids(pool) == [1, 0]
    pool.check_invariants()


def test_check_invariants_catches_a_ref_count_out_of_step_with_the_queue() -> None:
    pool = BlockPool(3, enable_caching=False)
    [block] = pool.allocate(1)
    pool.check_invariants()
    block.ref_count = 0  # says free, but not in the queue
    with pytest.raises(AssertionError, match="block 0 queue state"):
        pool.check_invariants()


def test_check_invariants_catches_a_stale_cached_key() -> None:
    pool = BlockPool(2, enable_caching=True)
    [block] = pool.allocate(1)
    key = BlockKey.chain(None, [1, 2])
    pool.cache(block, key)
    pool.check_invariants()
    block.key = BlockKey.chain(None, [3, 4])
    with pytest.raises(AssertionError, match="stale key"):
        pool.check_invariants()


# -- Lazy creation -----------------------------------------------------------------------------


def test_a_large_pool_creates_blocks_only_when_they_are_first_taken() -> None:
    pool = BlockPool(4 * 2**20, enable_caching=True)
    assert pool.blocks.created == []
    assert pool.num_free_blocks == 4 * 2**20
    taken = pool.allocate(3)
    assert [block.block_id for block in taken] == [0, 1, 2]
    assert [block.block_id for block in pool.blocks.created] == [0, 1, 2]
    pool.release(reversed(taken))
    # Never-used blocks stay ahead of freed ones, as if all had been queued at start.
    assert [block.block_id for block in pool.allocate(2)] == [3, 4]
    assert pool.num_used_blocks == 2
    pool.check_invariants()


def test_lazy_blocks_index_like_a_list() -> None:
    pool = BlockPool(6, enable_caching=False)
    assert pool.blocks[4].block_id == 4 and pool.blocks[-1].block_id == 5
    assert pool.blocks[4] is pool.blocks[4]
    assert [block.block_id for block in pool.blocks[1:6:2]] == [1, 3, 5]
    assert [block.block_id for block in pool.blocks] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(IndexError, match="block id 6"):
        pool.blocks[6]
    # Created early by the look-ups, the blocks are still free and queued in id order.
    assert free_ids(pool) == [0, 1, 2, 3, 4, 5]
    pool.check_invariants()


def test_a_never_used_block_taken_from_the_middle_is_skipped_then_requeued() -> None:
    pool = BlockPool(6, enable_caching=False)
    middle = pool.blocks[3]
    pool.share(middle)  # one owner for a block still in the queue's run (a test-only path)
    assert middle.ref_count == 1
    assert free_ids(pool) == [0, 1, 2, 4, 5]
    pool.check_invariants()
    pool.release([middle])
    assert free_ids(pool) == [0, 1, 2, 4, 5, 3]
    assert [block.block_id for block in pool.allocate(5)] == [0, 1, 2, 4, 5]
    assert [block.block_id for block in pool.allocate(1)] == [3]
    assert pool.num_free_blocks == 0
    pool.check_invariants()


def test_popleft_many_spans_the_run_and_the_linked_part() -> None:
    blocks = [KVBlock(block_id) for block_id in range(6)]
    queue = FreeBlockQueue(blocks)
    first = queue.popleft_many(4)
    queue.append(first[2])
    queue.append(first[0])
    assert queue_ids(queue) == [4, 5, 2, 0]
    assert [block.block_id for block in queue.popleft_many(3)] == [4, 5, 2]
    assert queue_ids(queue) == [0] and len(queue) == 1
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    with pytest.raises(IndexError):
        queue.popleft_many(2)
    queue.check_invariants()
