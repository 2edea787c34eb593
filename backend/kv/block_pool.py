"""The pool of KV blocks: reference counts, an LRU free queue and the prefix-cache index.

Pure bookkeeping (no torch): a block here is an id into the per-layer K/V tensors.

A block is in exactly one of three states:
- in use: ref_count > 0, not in the free queue;
- free and cached: ref_count == 0, in the free queue, still findable by its hash (a later request
  with the same prefix may revive it);
- free and empty: ref_count == 0, in the free queue, no hash.
Allocation takes from the head of the free queue, so cached blocks are evicted least recently
freed first. Block objects are created on first use and the queue starts as an implicit run of
ids, so a GPU-sized pool (millions of blocks) costs nothing to construct.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import overload


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
    def chain(
        cls, parent: BlockKey | None, token_ids: Sequence[int], root: int | None = None
    ) -> BlockKey:
        """The key of a block after `parent`; a first block (no parent) hangs from `root`,
        which tells apart chains whose KV differs for the same tokens (see long_context.py)."""
        parent_hash = parent.hash if parent is not None else root
        token_tuple = tuple(token_ids)
        return cls(parent_hash, token_tuple, hash((parent_hash, token_tuple)))

    def __hash__(self) -> int:
        return self.hash


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None
    # Links of the free queue's linked part; None otherwise (in use, or in its leading run).
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None


class LazyBlocks(Sequence[KVBlock]):
    """Blocks 0..num_blocks-1, each created on first access (always in id order, so the created
    ones are a prefix): a pool of millions of blocks starts in O(1) instead of seconds."""

    def __init__(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks
        self._created: list[KVBlock] = []

    def __len__(self) -> int:
        return self._num_blocks

    @overload
    def __getitem__(self, index: int) -> KVBlock: ...

    @overload
    def __getitem__(self, index: slice) -> list[KVBlock]: ...

    def __getitem__(self, index: int | slice) -> KVBlock | list[KVBlock]:
        created = self._created
        if isinstance(index, slice):
            block_ids = range(*index.indices(self._num_blocks))
            if block_ids:
                self._create_through(max(block_ids[0], block_ids[-1]))
            return [created[block_id] for block_id in block_ids]
        if 0 <= index < len(created):
            return created[index]
        if index < 0:
            return self[index + self._num_blocks]
        if index >= self._num_blocks:
            raise IndexError(f"block id {index} out of range 0..{self._num_blocks - 1}")
        self._create_through(index)
        return created[index]

    def _create_through(self, block_id: int) -> None:
        created = self._created
        created.extend(map(KVBlock, range(len(created), block_id + 1)))

    def __iter__(self) -> Iterator[KVBlock]:
        return (self[block_id] for block_id in range(self._num_blocks))

    @property
    def created(self) -> list[KVBlock]:
        """The blocks created so far (ids 0..len-1); every other one is free, empty and still in
        the free queue's run."""
        return self._created


class FreeBlockQueue:
    """The free blocks in eviction order, in two parts: a leading run of `blocks` never taken
    yet, in order, kept as a position (so a fresh queue of millions costs nothing to build), then
    a doubly linked list threaded through the blocks (O(1) append, pop and removal from the
    middle: a cached block revived by a prefix hit leaves the queue wherever it is).

    NOTE: `blocks[i].block_id == i`. Blocks leave the run only from its head (popleft), except
    a removal from its middle, recorded in `_run_removed` and skipped when the head gets there;
    every append goes to the linked list, so the run stays ahead of all of it.
    """

    def __init__(self, blocks: Sequence[KVBlock]) -> None:
        self._run = blocks
        self._run_end = len(blocks)
        self._run_next = 0
        self._run_removed: set[int] = set()
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._length = len(blocks)

    def __len__(self) -> int:
        return self._length

    def __contains__(self, block: KVBlock) -> bool:
        return block.prev_free is not None or self._in_run(block)

    def _in_run(self, block: KVBlock) -> bool:
        block_id = block.block_id
        return self._run_next <= block_id < self._run_end and block_id not in self._run_removed

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._length += 1

    def popleft(self) -> KVBlock:
        return self.popleft_many(1)[0]

    def popleft_many(self, count: int) -> list[KVBlock]:
        """The first `count` blocks, in queue order; the run's share is taken in slices."""
        if count > self._length:
            raise IndexError(f"asked for {count} free KV blocks, {self._length} queued")
        taken: list[KVBlock] = []
        while len(taken) < count and self._run_next < self._run_end:
            stop = min(self._run_next + count - len(taken), self._run_end)
            chunk = self._run[self._run_next : stop]
            if self._run_removed:
                skipped = self._run_removed.intersection(range(self._run_next, stop))
                self._run_removed -= skipped
                chunk = [block for block in chunk if block.block_id not in skipped]
            taken.extend(chunk)
            self._run_next = stop
        block = self._head.next_free
        for _ in range(count - len(taken)):
            assert block is not None
            next_block = block.next_free
            block.prev_free = block.next_free = None
            taken.append(block)
            block = next_block
        assert block is not None
        self._head.next_free = block
        block.prev_free = self._head
        self._length -= count
        return taken

    def remove(self, block: KVBlock) -> None:
        if block.prev_free is None:
            assert self._in_run(block), "block is not in the free queue"
            if block.block_id == self._run_next:
                self._run_next += 1
            else:
                self._run_removed.add(block.block_id)
            self._length -= 1
            return
        prev_block, next_block = block.prev_free, block.next_free
        assert next_block is not None
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = block.next_free = None
        self._length -= 1

    def __iter__(self) -> Iterator[KVBlock]:
        for block_id in range(self._run_next, self._run_end):
            if block_id not in self._run_removed:
                yield self._run[block_id]
        yield from self.linked()

    def check_invariants(self) -> None:
        """Assert the two parts agree with each other and with the length (for tests)."""
        linked = list(self.linked())
        assert len({block.block_id for block in linked}) == len(linked), "block queued twice"
        assert not any(self._in_run(block) for block in linked), "block queued twice"
        assert all(block_id >= self._run_next for block_id in self._run_removed)
        run_length = self._run_end - self._run_next - len(self._run_removed)
        assert self._length == run_length + len(linked), "free queue length out of date"

    def linked(self) -> Iterator[KVBlock]:
        """The blocks of the linked part, in order (for checks: the run is consistent by
        construction)."""
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
        self.blocks = LazyBlocks(num_blocks)
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
        allocated = self.free_queue.popleft_many(count)
        for block in allocated:
            self._evict(block)
            block.ref_count = 1
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

    def drop_unreferenced_cached(self) -> int:
        """Forget the prefix-cache key of every free cached block (it stays in the free queue,
        now empty) and return how many were dropped. Cached blocks that sequences still hold
        keep their keys: their KV is live and correct, and dropping the key would free nothing.

        NOTE: safe between steps while requests run: no table refers to a free block, so no
        sequence loses KV it uses; a later prompt just finds fewer blocks to reuse."""
        dropped = [block for block in self.cached.values() if block.ref_count == 0]
        for block in dropped:
            assert block.key is not None
            del self.cached[block.key]
            block.key = None
        return len(dropped)

    def _evict(self, block: KVBlock) -> None:
        if block.key is not None:
            del self.cached[block.key]
            block.key = None
            self.num_evictions += 1

    def check_invariants(self) -> None:
        """Assert the pool's bookkeeping is consistent (for tests). Blocks never created are
        free, empty and in the queue's run by construction; only created ones are checked."""
        self.free_queue.check_invariants()
        for block in self.blocks.created:
            queued = block in self.free_queue
            assert queued == (block.ref_count == 0), f"block {block.block_id} queue state"
            assert block.ref_count >= 0
        for key, block in self.cached.items():
            assert block.key == key, f"block {block.block_id} cached under a stale key"
        shared = sum(1 for block in self.blocks.created if block.ref_count > 1)
        assert self.num_shared_blocks == shared, "shared-block count out of date"
