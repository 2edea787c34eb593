"""The pool of KV blocks: reference counts, an LRU free queue and the prefix-cache index.

Pure bookkeeping (no torch): a block here is an id into the per-layer K/V tensors.

A block is in exactly one of three states:
- in use: ref_count > 0, not in the free queue;
- free and cached: ref_count == 0, in the free queue, still findable by its hash (a later request
  with the same prefix may revive it);
- free and empty: ref_count == 0, in the free queue, no hash.
Allocation takes from the head of the free queue, so cached blocks are evicted least recently
freed first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Identity of a full block's contents: the key of its predecessor and its own tokens.

    Comparing keys compares the tokens themselves, so a hash collision can never make one prefix
    reuse another's KV; `hash` is what keeps the look-up cheap.
    """

    parent_hash: int | None
    token_ids: tuple[int, ...]
    hash: int

    @classmethod
    def chain(cls, parent: BlockKey | None, token_ids: Sequence[int]) -> BlockKey:
        parent_hash = parent.hash if parent is not None else None
        token_tuple = tuple(token_ids)
        return cls(parent_hash, token_tuple, hash((parent_hash, token_tuple)))

    def __hash__(self) -> int:
        return self.hash


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None
    # Links of the free queue; None while the block is in use.
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class FreeBlockQueue:
    """Doubly linked list threaded through the blocks: O(1) append, pop and removal from the
    middle (a cached block revived by a prefix hit leaves the queue wherever it is)."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._length = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._length

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._length += 1

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("no free KV blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev_block, next_block = block.prev_free, block.next_free
        assert prev_block is not None and next_block is not None, "block is not in the free queue"
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self._length -= 1

    def __iter__(self):
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockKey, KVBlock] = {}
        self.num_evictions = 0
        self.num_shared_blocks = 0  # blocks with more than one owner, kept up to date in O(1)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached ones included (allocation evicts them)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, count: int) -> list[KVBlock]:
        """Take `count` blocks, each with ref_count 1, evicting cached ones as needed.
        The caller checks `num_free_blocks` first; asking for more is a bug."""
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        allocated = []
        for _ in range(count):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            allocated.append(block)
        return allocated

    def lookup(self, key: BlockKey) -> KVBlock | None:
        return self.cached.get(key) if self.enable_caching else None

    def share(self, block: KVBlock) -> None:
        """One more owner for a block: a prefix-cache hit (reviving a free cached block) or a fork."""
        if block.ref_count == 0:
            self.free_queue.remove(block)
        block.ref_count += 1
        if block.ref_count == 2:
            self.num_shared_blocks += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one owner from each block; blocks nobody owns go to the tail of the free queue.

        NOTE: callers pass a sequence's blocks last first, so a request's tail blocks (the least
        likely to be shared by a later prompt) are evicted before its head blocks.
        """
        for block in blocks:
            assert block.ref_count > 0, f"double free of KV block {block.block_id}"
            block.ref_count -= 1
            if block.ref_count == 1:
                self.num_shared_blocks -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def cache(self, block: KVBlock, key: BlockKey) -> None:
        """Make a full, computed block findable by its key. The first block cached under a key
        keeps it: a duplicate computed concurrently stays private and is freed normally."""
        if not self.enable_caching or block.key is not None or key in self.cached:
            return
        block.key = key
        self.cached[key] = block

    def _evict(self, block: KVBlock) -> None:
        if block.key is not None:
            del self.cached[block.key]
            block.key = None
            self.num_evictions += 1

    def check_invariants(self) -> None:
        """Assert the pool's bookkeeping is consistent (for tests)."""
        in_queue = list(self.free_queue)
        assert len(in_queue) == len(self.free_queue)
        assert len({b.block_id for b in in_queue}) == len(in_queue), "block queued twice"
        for block in self.blocks:
            queued = block.prev_free is not None
            assert queued == (block.ref_count == 0), f"block {block.block_id} queue state"
            assert block.ref_count >= 0
        for key, block in self.cached.items():
            assert block.key == key, f"block {block.block_id} cached under a stale key"
        shared = sum(1 for block in self.blocks if block.ref_count > 1)
        assert self.num_shared_blocks == shared, "shared-block count out of date"
