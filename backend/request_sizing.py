"""How many KV blocks a request needs: to hold its tokens now, as it grows, and at most.

The scheduler asks before admitting a request (will its tokens fit, with room for the running
requests to grow?) and the engine before queueing one (could it ever fit the whole cache?). The
full blocks of a group's common history (the prompt its samples or beams share) count once;
every other block is one sample's own.
"""

from __future__ import annotations

import dataclasses

from pagoda.backend.errors import (
    InvalidParameter,
    KVCacheCapacityExceeded,
    RequestRejected,
)
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.sequence import SequenceGroup


class RequestSizer:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len

    def blocks_to_come(self, group: SequenceGroup, growth_ratio: float) -> int:
        """Blocks `group` is expected to add before it finishes: for its tokens not computed yet
        and for `growth_ratio` of the tokens it may still generate."""
        held = {block.block_id for seq in group.live_seqs
                for block in self.blocks.block_tables.get(seq.seq_id, [])}
        return max(0, self.blocks_for_all_tokens(group, growth_ratio) - len(held))

    def check_fits(self, group: SequenceGroup) -> None:
        """Raise the RequestRejected of a group that could never run, even alone in an empty
        cache, counting all the tokens its max_tokens lets it generate. Without max_tokens only
        its tokens now count: it may stop at any length, so only what it holds must fit."""
        growth_ratio = 0.0 if group.params.max_tokens is None else 1.0
        error = self.never_fits(group, growth_ratio)
        if error is not None:
            raise error

    def never_fits(
        self, group: SequenceGroup, growth_ratio: float = 0.0
    ) -> RequestRejected | None:
        """Why a group can never be scheduled, even alone, once it holds its tokens now and
        `growth_ratio` of those it may still generate; None when it can."""
        num_seqs = len(group.live_seqs)
        if num_seqs > min(self.max_num_seqs, self.max_num_batched_tokens):
            return InvalidParameter(
                "n" if group.params.best_of is None else "best_of",
                f"request runs {num_seqs} sequences but a step takes at most {self.max_num_seqs} "
                f"sequences and {self.max_num_batched_tokens} tokens",
            )
        if self.blocks_for_all_tokens(group, growth_ratio) > self.blocks.pool.num_blocks:
            return self.too_large_error(group, growth_ratio)
        return None

    def blocks_for_all_tokens(self, group: SequenceGroup, growth_ratio: float = 0.0) -> int:
        """Blocks `group` needs to hold all its tokens, and `growth_ratio` of the tokens it may
        still generate (so 0 for its tokens now)."""
        seqs = group.live_seqs
        if len(seqs) == 1:
            num_common = 0
        elif group.shares_prompt_prefill:
            num_common = len(group.prompt_token_ids) // self.blocks.block_size
        else:
            num_common = group.common_history_len() // self.blocks.block_size
        # The full blocks of the common history are stored once; the rest is each sample's own.
        max_tokens = group.params.max_tokens or self.max_model_len
        total = num_common
        for seq in seqs:
            length = len(seq.token_ids)
            remaining = min(max_tokens - seq.num_output_tokens, self.max_model_len - length)
            expected = length + int(max(0, remaining) * growth_ratio)
            total += self.blocks.num_blocks_for(expected) - num_common
        return total

    def too_large_error(
        self, group: SequenceGroup, growth_ratio: float = 0.0
    ) -> KVCacheCapacityExceeded:
        """The error of a group larger than the whole cache (its message says by how much)."""
        return KVCacheCapacityExceeded(
            self.blocks_for_all_tokens(group, growth_ratio), self.blocks.pool.num_blocks,
            self.blocks.block_size, self._largest_fitting_request(group),
        )

    def _largest_fitting_request(self, group: SequenceGroup) -> int | None:
        """The largest prompt + max_tokens x n that fits the whole cache for `group`'s prompt and
        number of samples, or None when not even max_tokens=1 does. Found by bisecting max_tokens
        through blocks_for_all_tokens, so it counts blocks exactly as admission does."""
        # NOTE: a copy of the group whose max_tokens alone changes (set unvalidated: min_tokens
        # may exceed it, which no block count reads).
        params = dataclasses.replace(group.params)
        probe = dataclasses.replace(group, params=params)
        fitting, too_large = 0, self.max_model_len - len(group.prompt_token_ids) + 1
        while too_large - fitting > 1:
            params.max_tokens = (fitting + too_large) // 2
            if self.blocks_for_all_tokens(probe, 1.0) <= self.blocks.pool.num_blocks:
                fitting = params.max_tokens
            else:
                too_large = params.max_tokens
        if fitting == 0:
            return None
        return len(group.prompt_token_ids) + fitting * len(group.live_seqs)
