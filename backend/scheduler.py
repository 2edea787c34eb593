"""Iteration-level scheduling under a token budget.

Every step, each running sequence gets its next prefill chunk or one decode token, running
requests first (oldest first), then waiting ones (first come, first served), until the step's
token budget (`max_num_batched_tokens`) or `max_num_seqs` is used up. A long prompt is therefore
prefilled in chunks alongside other requests' decodes.

`update_from_output` applies a step's results: it advances each sequence's computed tokens,
publishes full blocks to the prefix cache, keeps prompt logprobs and pooled states (a pooling
request is done once its prompt is fed), forks the samples that shared a prefill, appends the
sampled tokens (with the stop checks), advances beam search, and frees what finished. All
per-step state changes happen here, between one schedule() and the next.

When the KV pool runs dry, the most recently arrived running request is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed from its prompt and the tokens
it had generated (so it resumes with the same output). A group of samples or beams recomputes
its common history once and forks it again. A request that cannot fit even alone fails by itself.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagoda.backend.beam_search import advance_beams
from pagoda.backend.errors import EngineError
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.long_context import LongContext
from pagoda.backend.model_output import BeamCandidates, ModelOutput
from pagoda.backend.prompt_logprobs import record_prompt_logprobs
from pagoda.backend.request_sizing import RequestSizer
from pagoda.backend.sequence import GroupStatus, Sequence, SequenceGroup
from pagoda.backend.stop_checker import StopChecker

logger = logging.getLogger(__name__)

# Fraction of the KV pool kept free when admitting new requests, so running ones can grow by a
# few decode steps before anything has to be preempted.
ADMISSION_WATERMARK = 0.01

# After a preemption, admission also keeps room for the running requests to grow: each is
# expected to generate this fraction of the tokens it may still generate. Without it, a full pool
# admits a request on the blocks free this step, the running ones fill them while decoding, and
# the newcomer is preempted and readmitted over and over, each time losing its prefill (SGLang's
# new-token ratio does the same job). Every step without a preemption lowers the fraction, down
# to 0, where admission looks at the free blocks alone (as vLLM's does, and as it starts).
GROWTH_RATIO_AFTER_PREEMPTION = 0.7
GROWTH_RATIO_DECAY = 0.001


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    group: SequenceGroup
    num_new_tokens: int
    # After this step the sequence's K/V covers all its tokens, so the model's logits at the last
    # token give its next one (False for a prefill chunk that leaves tokens for later steps).
    samples_next_token: bool
    # Samples of the same request riding on this sequence's prompt prefill: once it completes,
    # they fork its blocks and each draws its own first token from the same logits.
    followers: list[Sequence] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    failed: list[SequenceGroup] = field(default_factory=list)
    # Copy-on-write block copies the model runner applies before this step's forward.
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        growth_ratio_after_preemption: float = GROWTH_RATIO_AFTER_PREEMPTION,
        long_context: LongContext | None = None,
    ) -> None:
        self.blocks = block_manager
        self.long_context = long_context
        self.sizer = RequestSizer(block_manager, max_num_seqs, max_num_batched_tokens,
                                  max_model_len)
        self.stop_checker = StopChecker(eos_token_ids, max_model_len)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.growth_ratio_after_preemption = growth_ratio_after_preemption
        self.growth_ratio = 0.0
        self.waiting: deque[SequenceGroup] = deque()
        # NOTE: kept in arrival order, so the preemption victim is always the last one.
        self.running: list[SequenceGroup] = []
        self.num_preemptions = 0
        self._watermark_blocks = int(ADMISSION_WATERMARK * block_manager.pool.num_blocks)

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def live_sequences(self) -> list[Sequence]:
        return [seq for group in self.running for seq in group.live_seqs]

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            group = self.running[index]
            plan = self._plan(group, budget)
            if not plan:
                # NOTE: a decode group that does not fit the remaining budget waits a step.
                index += 1
                continue
            if not self._allocate_or_preempt(group, plan, output):
                continue  # the group left `running` (preempted or failed): same index, next group
            output.scheduled.extend(plan)
            budget -= sum(item.num_new_tokens for item in plan)
            index += 1
        if output.preempted:
            self.growth_ratio = self.growth_ratio_after_preemption
        else:
            self.growth_ratio = max(0.0, self.growth_ratio - GROWTH_RATIO_DECAY)
            self._admit_waiting(output, budget)
        output.block_copies = self.blocks.take_block_copies()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[SequenceGroup]:
        """Apply the results of the step `scheduler_output` planned. Returns the groups to report
        on, each once: those that drew tokens, failed, or finished (a beam search group only
        once it finishes: its beams can still change course)."""
        touched: dict[str, SequenceGroup] = {g.request_id: g for g in scheduler_output.failed}
        beams: dict[str, tuple[SequenceGroup, list[tuple[Sequence, BeamCandidates]]]] = {}
        # Groups that drew tokens from K/V computed short: they may have grown long now.
        drew_while_short: dict[str, SequenceGroup] = {}
        for item in scheduler_output.scheduled:
            seq, group = item.seq, item.group
            seq.num_computed_tokens += item.num_new_tokens
            self.blocks.cache_computed_blocks(seq)
            if (self.long_context is not None and item.samples_next_token
                    and not self.long_context.is_long(seq.num_computed_tokens)):
                drew_while_short[group.request_id] = group
            if self._record_prefill_outputs(item, model_output):
                touched[group.request_id] = group
            candidates = model_output.beam_candidates.get(seq.seq_id)
            if candidates is not None:
                beams.setdefault(group.request_id, (group, []))[1].append((seq, candidates))
            elif seq.seq_id in model_output.tokens:
                self._append_tokens(item, model_output)
                touched[group.request_id] = group
        for group, rows in beams.values():
            advance_beams(group, rows, self.blocks)
            if group.is_finished:
                touched[group.request_id] = group
        for group in touched.values():
            if group.is_finished:
                self.finish(group)
        self._recompute_grown_long(drew_while_short.values())
        return list(touched.values())

    def _recompute_grown_long(self, groups: Iterable[SequenceGroup]) -> None:
        """Send back to the queue the groups whose sequences just grew past the long-context
        threshold: their K/V was computed short and is recomputed long, as transformers does."""
        long_context = self.long_context
        if long_context is None:
            return
        grown = [
            group for group in groups
            if not group.is_finished
            and any(long_context.is_long(len(seq.token_ids)) for seq in group.live_seqs)
        ]
        for group in grown:
            logger.info("request %s grew past %d tokens; recomputing it with long-context "
                        "rotary frequencies", group.request_id, long_context.threshold)
        if grown:
            self.requeue(grown)

    def _record_prefill_outputs(self, item: ScheduledSequence, model_output: ModelOutput) -> bool:
        """Keep the step's prompt logprobs and pooled states of the sequence. True when its
        request is prefill only (max_tokens=0, pooling) and has now fed its whole prompt: done."""
        seq, group = item.seq, item.group
        scored = model_output.prompt_logprobs.get(seq.seq_id)
        if scored is not None:
            record_prompt_logprobs(group, scored)
        pooled = model_output.pooled.get(seq.seq_id)
        if pooled is not None and group.pooling is not None:
            group.pooling.add(pooled)
        if not group.prefill_only or seq.num_uncomputed_tokens:
            return False
        for done in group.live_seqs:
            done.finish("length")
        return True

    def _append_tokens(self, item: ScheduledSequence, model_output: ModelOutput) -> None:
        """The sequence's accepted tokens, and its followers' once they fork its prefill."""
        lead = item.seq
        for follower in item.followers:
            self.blocks.fork(lead, follower)
            follower.num_computed_tokens = lead.num_computed_tokens
        for seq in (lead, *item.followers):
            for token in model_output.tokens[seq.seq_id]:
                self.stop_checker.append_token(item.group, seq, token)
                if seq.is_finished:
                    # Its siblings may run on; its blocks are not needed any more.
                    self.blocks.free(seq)
                    break

    def _plan(self, group: SequenceGroup, budget: int) -> list[ScheduledSequence]:
        """Each live sequence's next chunk within the budget, or [] when the group cannot get at
        least one token per sequence (a group is always scheduled whole). Samples that have not
        diverged yet share one prefill, run by the first of them."""
        seqs = group.live_seqs
        if group.shares_prompt_prefill:
            lead = seqs[0]
            num_new = min(lead.num_uncomputed_tokens, budget)
            done = lead.num_computed_tokens + num_new == len(lead.token_ids)
            return [ScheduledSequence(lead, group, num_new, done, followers=seqs[1:])]
        history = self._plan_common_history(group, seqs, budget)
        if history is not None:
            return history
        if group.beam is not None and any(seq.num_uncomputed_tokens > 1 for seq in seqs):
            return self._plan_beam_recompute(group, seqs, budget)
        plan = []
        for index, seq in enumerate(seqs):
            # NOTE: keep one token of budget for each sequence after this one.
            reserved = len(seqs) - 1 - index
            num_new = min(seq.num_uncomputed_tokens, budget - reserved)
            if num_new <= 0:
                return []
            done = seq.num_computed_tokens + num_new == len(seq.token_ids)
            plan.append(ScheduledSequence(seq, group, num_new, samples_next_token=done))
            budget -= num_new
        return plan

    def _plan_common_history(
        self, group: SequenceGroup, seqs: list[Sequence], budget: int
    ) -> list[ScheduledSequence] | None:
        """A group resuming after a preemption recomputes what its samples have in common once:
        the first live sample computes the common history alone, then the others fork its blocks
        and recompute only their own tokens (without this, n samples would recompute and store
        the prompt n times). None once every sample holds its blocks."""
        unforked = [seq for seq in seqs[1:] if seq.num_computed_tokens == 0]
        if not unforked:
            return None
        lead, common = seqs[0], group.common_history_len()
        if lead.num_computed_tokens < common:
            num_new = min(common - lead.num_computed_tokens, budget)
            return [ScheduledSequence(lead, group, num_new, samples_next_token=False)]
        for seq in unforked:
            self.blocks.fork(lead, seq, num_tokens=common)
            seq.num_computed_tokens = common
        return None

    def _plan_beam_recompute(
        self, group: SequenceGroup, seqs: list[Sequence], budget: int
    ) -> list[ScheduledSequence]:
        """Beams recomputed after a preemption are fed all but their last token first, in
        chunks; only once every beam is there do they take their last token together. A beam
        step ranks all beams at once, so their next-token rows must come from the same step."""
        plan = []
        for seq in seqs:
            num_new = min(seq.num_uncomputed_tokens - 1, budget)
            if num_new <= 0:
                continue
            plan.append(ScheduledSequence(seq, group, num_new, samples_next_token=False))
            budget -= num_new
        return plan

    def _allocate_or_preempt(
        self, group: SequenceGroup, plan: list[ScheduledSequence], output: SchedulerOutput
    ) -> bool:
        while not self._allocate(plan):
            victim = self.running[-1]
            if victim is group and len(self.running) == 1:
                self._fail(group, output, self.sizer.too_large_error(group))
                return False
            self._preempt(victim, output)
            if victim is group:
                return False
        return True

    def _allocate(self, plan: list[ScheduledSequence]) -> bool:
        needed = sum(self.blocks.num_new_blocks_needed(item.seq, item.num_new_tokens) for item in plan)
        if needed > self.blocks.num_free_blocks:
            return False
        for item in plan:
            allocated = self.blocks.allocate_slots(item.seq, item.num_new_tokens)
            assert allocated
        return True

    def _growth_blocks(self, group: SequenceGroup) -> int:
        """The room a running `group` keeps to grow (none until a preemption, see above)."""
        return self.sizer.blocks_to_come(group, self.growth_ratio) if self.growth_ratio else 0

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        num_seqs = sum(len(group.live_seqs) for group in self.running)
        # The running requests' room to grow; each admitted one adds its own.
        reserved = sum(self._growth_blocks(group) for group in self.running) if self.waiting else 0
        while self.waiting and budget > 0:
            group = self.waiting[0]
            seqs = group.live_seqs
            problem = self.sizer.never_fits(group)
            if problem is not None:
                self.waiting.popleft()
                self._fail(group, output, problem)
                continue
            if num_seqs + len(seqs) > self.max_num_seqs:
                break
            # The other samples of a group fork the first one's blocks once it has computed what
            # they have in common (see _plan).
            lead = seqs[0]
            lead.num_computed_tokens = self.blocks.match_prefix(
                lead, lookup=not group.feeds_every_prompt_position
            )
            plan = self._plan(group, budget)
            # Room for all the group's tokens now, not only this step's chunk: a group resuming
            # after a preemption that fit its first chunk (the common history) but not its
            # samples' own tokens would preempt itself on the next step, over and over.
            needed = max(
                sum(self.blocks.num_new_blocks_needed(i.seq, i.num_new_tokens) for i in plan),
                self.sizer.blocks_to_come(group, 0.0),
            )
            free = self.blocks.num_free_blocks
            headroom = self._watermark_blocks + reserved if self.running else 0
            if not plan or needed > free - headroom:
                self._release(group)
                if not self.blocks.block_tables and needed > free:
                    # Nothing else holds blocks, so waiting cannot help.
                    self.waiting.popleft()
                    self._fail(group, output, self.sizer.too_large_error(group))
                    continue
                break
            self._allocate(plan)
            self.blocks.record_prefix_match(lead)
            self.waiting.popleft()
            group.status = GroupStatus.RUNNING
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = time.monotonic()
            self.running.append(group)
            output.scheduled.extend(plan)
            budget -= sum(item.num_new_tokens for item in plan)
            num_seqs += len(seqs)
            reserved += self._growth_blocks(group)

    def requeue(self, groups: list[SequenceGroup]) -> None:
        """Send `groups` back to the front of the queue, in order, to be recomputed from their
        tokens (as after a preemption, without counting one)."""
        for group in reversed(groups):
            if group in self.running:
                self.running.remove(group)
            elif group in self.waiting:
                self.waiting.remove(group)
            self._release(group)
            group.status = GroupStatus.WAITING
            self.waiting.appendleft(group)

    def schedule_alone(self, group: SequenceGroup) -> SchedulerOutput:
        """A step for the waiting `group` only; the other groups keep their places (and their
        blocks). Used to find which request a failing step failed on. The group may stay waiting
        (an empty plan) when the blocks held by others leave it no room."""
        running, waiting = self.running, self.waiting
        waiting.remove(group)
        self.running, self.waiting = [], deque([group])
        try:
            return self.schedule()
        finally:
            running.extend(self.running)
            waiting.extendleft(self.waiting)
            self.running, self.waiting = running, waiting

    def _preempt(self, group: SequenceGroup, output: SchedulerOutput) -> None:
        self.running.remove(group)
        self._release(group)
        group.status = GroupStatus.WAITING
        self.waiting.appendleft(group)
        self.num_preemptions += 1
        output.preempted.append(group)
        logger.info("preempted request %s (KV cache full); it will be recomputed", group.request_id)

    def _release(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            self.blocks.free(seq)
            seq.reset_for_recompute()

    def _fail(self, group: SequenceGroup, output: SchedulerOutput, error: EngineError) -> None:
        if group in self.running:
            self.running.remove(group)
        self._release(group)
        group.fail(error)
        group.status = GroupStatus.FINISHED
        output.failed.append(group)
        logger.error("request %s failed: %s", group.request_id, error)

    def check_fits(self, group: SequenceGroup) -> None:
        """Raise the RequestRejected of a group that could never run (RequestSizer.check_fits)."""
        self.sizer.check_fits(group)

    def finish(self, group: SequenceGroup) -> None:
        """Remove a finished or aborted group from the queues and free its blocks."""
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        for seq in group.seqs:
            self.blocks.free(seq)
        group.status = GroupStatus.FINISHED
