"""Block tables: which KV blocks hold each sequence's tokens.

A sequence's token at position p lives in slot `table[p // block_size].block_id * block_size +
p % block_size`. Tables only grow while a sequence runs and are released whole when it finishes
or is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pagoda.backend.kv.block_pool import BlockKey, BlockPool, KVBlock
from pagoda.backend.long_context import LongContext

# The root of the prefix-cache chains of long sequences (LongRoPE; short ones start from None).
LONG_CONTEXT_ROOT = hash("pagoda.long-context")


class SequenceTokens(Protocol):
    """What the block manager needs to know of a sequence."""

    seq_id: int
    token_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class KVStats:
    num_blocks: int
    num_used_blocks: int
    num_tokens: int  # token slots filled by live sequences, shared blocks counted once
    block_size: int

    @property
    def waste(self) -> float:
        """Fraction of the slots in used blocks that hold no token (0 when nothing is used)."""
        slots = self.num_used_blocks * self.block_size
        return 1.0 - self.num_tokens / slots if slots else 0.0


@dataclass(frozen=True, slots=True)
class PrefixCacheFlush:
    """What a prefix-cache flush did: cached blocks nobody held were forgotten (their memory is
    free and empty now); those live sequences hold stayed cached."""

    num_dropped_blocks: int
    num_kept_blocks: int


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        long_context: LongContext | None = None,
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.long_context = long_context
        self.block_tables: dict[int, list[KVBlock]] = {}
        # Keys of each sequence's leading full blocks, in order (only with prefix caching).
        self._block_keys: dict[int, list[BlockKey]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_copy_on_write = 0
        # (source, destination) block ids the model runner must copy before the next forward.
        self._pending_copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: SequenceTokens, num_new_tokens: int) -> int:
        table = self.block_tables.get(seq.seq_id, [])
        grow = max(0, self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(table))
        return grow + (1 if self._shared_write_block(seq, table) is not None else 0)

    def _shared_write_block(self, seq: SequenceTokens, table: list[KVBlock]) -> int | None:
        """Index of the partly filled block the next token goes into, when another sequence holds
        it too (a fork's shared last block): writing there needs a private copy first."""
        if seq.num_computed_tokens % self.block_size == 0:
            return None  # the next token starts a fresh block
        index = seq.num_computed_tokens // self.block_size
        if index < len(table) and table[index].ref_count > 1:
            return index
        return None

    def match_prefix(self, seq: SequenceTokens, lookup: bool = True) -> int:
        """Attach the cached blocks that hold a prefix of a sequence with no blocks yet.

        Returns how many leading tokens are already computed. The last token is never taken from
        the cache: the model must run on at least one token to produce the next token's logits.
        lookup=False starts the sequence with no cached block (all its positions must run).
        """
        assert seq.seq_id not in self.block_tables, "prefix matching is for fresh sequences"
        table: list[KVBlock] = []
        keys: list[BlockKey] = []
        self.block_tables[seq.seq_id] = table
        self._block_keys[seq.seq_id] = keys
        if not (self.pool.enable_caching and lookup):
            return 0
        num_matchable = (len(seq.token_ids) - 1) // self.block_size
        parent: BlockKey | None = None
        root = self._chain_root(seq)
        for index in range(num_matchable):
            start = index * self.block_size
            key = BlockKey.chain(parent, seq.token_ids[start : start + self.block_size], root)
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.share(block)
            table.append(block)
            keys.append(key)
            parent = key
        return len(table) * self.block_size

    def record_prefix_match(self, seq: SequenceTokens) -> None:
        """Count a committed prefix lookup in the stats, in blocks: the ones that could have hit
        and the ones that did. Separate from match_prefix, which the scheduler may undo."""
        if self.pool.enable_caching:
            self.prefix_cache_queries += (len(seq.token_ids) - 1) // self.block_size
            self.prefix_cache_hits += seq.num_computed_tokens // self.block_size

    def allocate_slots(self, seq: SequenceTokens, num_new_tokens: int) -> bool:
        """Grow the table to hold `num_new_tokens` more tokens. False, changing nothing, when
        there are not enough free blocks."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        table = self.block_tables.setdefault(seq.seq_id, [])
        shared = self._shared_write_block(seq, table)
        if shared is not None:
            # Copy-on-write: this sequence moves to a private copy; the others keep the original.
            (private,) = self.pool.allocate(1)
            self._pending_copies.append((table[shared].block_id, private.block_id))
            self.pool.release([table[shared]])
            table[shared] = private
            self.num_copy_on_write += 1
            needed -= 1
        if needed:
            table.extend(self.pool.allocate(needed))
        return True

    def fork(
        self, parent: SequenceTokens, child: SequenceTokens, num_tokens: int | None = None
    ) -> None:
        """Give `child` the parent's blocks holding its first `num_tokens` tokens (all by
        default), shared: one more reference each. The first write into a shared block that is
        not full of common tokens copies it (see allocate_slots)."""
        assert child.seq_id not in self.block_tables, "fork into a sequence that holds blocks"
        table = self.block_tables[parent.seq_id]
        keys = self._block_keys.get(parent.seq_id, [])
        if num_tokens is not None:
            table = table[: self.num_blocks_for(num_tokens)]
            keys = keys[: num_tokens // self.block_size]
        for block in table:
            self.pool.share(block)
        self.block_tables[child.seq_id] = list(table)
        self._block_keys[child.seq_id] = list(keys)

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies decided since the last call, in order."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def cache_computed_blocks(self, seq: SequenceTokens) -> None:
        """Publish the sequence's newly completed full blocks to the prefix cache."""
        if not self.pool.enable_caching:
            return
        keys = self._block_keys.setdefault(seq.seq_id, [])
        table = self.block_tables[seq.seq_id]
        num_full = seq.num_computed_tokens // self.block_size
        parent = keys[-1] if keys else None
        # NOTE: called before the step's sampled tokens are appended, so the sequence's length
        # is the one its blocks were computed at.
        root = self._chain_root(seq)
        for index in range(len(keys), num_full):
            start = index * self.block_size
            key = BlockKey.chain(parent, seq.token_ids[start : start + self.block_size], root)
            self.pool.cache(table[index], key)
            keys.append(key)
            parent = key

    def _chain_root(self, seq: SequenceTokens) -> int | None:
        long = self.long_context is not None and self.long_context.is_long(len(seq.token_ids))
        return LONG_CONTEXT_ROOT if long else None

    def flush_prefix_cache(self) -> PrefixCacheFlush:
        """Empty the prefix cache of every block no sequence holds (see
        BlockPool.drop_unreferenced_cached). Sequences keep their tables and their own keys, so
        their blocks go on being published as they fill."""
        dropped = self.pool.drop_unreferenced_cached()
        return PrefixCacheFlush(num_dropped_blocks=dropped, num_kept_blocks=len(self.pool.cached))

    def block_ids(self, seq_id: int) -> list[int]:
        return [block.block_id for block in self.block_tables[seq_id]]

    def free(self, seq: SequenceTokens) -> None:
        """Release a sequence's blocks (no-op for a sequence that holds none)."""
        table = self.block_tables.pop(seq.seq_id, None)
        self._block_keys.pop(seq.seq_id, None)
        if table:
            self.pool.release(reversed(table))

    def stats(self, live_seqs: list[SequenceTokens]) -> KVStats:
        filled: dict[int, int] = {}
        for seq in live_seqs:
            for index, block in enumerate(self.block_tables.get(seq.seq_id, [])):
                tokens_in_block = min(self.block_size, seq.num_computed_tokens - index * self.block_size)
                filled[block.block_id] = max(filled.get(block.block_id, 0), tokens_in_block, 0)
        return KVStats(
            num_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            num_tokens=sum(filled.values()),
            block_size=self.block_size,
        )

    def check_invariants(self) -> None:
        """Assert tables and the pool agree: every reference is held by a table (for tests)."""
        self.pool.check_invariants()
        references: dict[int, int] = {}
        for table in self.block_tables.values():
            for block in table:
                references[block.block_id] = references.get(block.block_id, 0) + 1
        for block in self.pool.blocks.created:  # never-created blocks have no owner
            assert block.ref_count == references.get(block.block_id, 0), (
                f"block {block.block_id}: ref_count {block.ref_count}, "
                f"held by {references.get(block.block_id, 0)} tables"
            )
