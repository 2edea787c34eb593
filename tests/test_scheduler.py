"""Scheduler: token budget, chunked prefill, admission, preemption and failure.

The real Scheduler and BlockManager run each step as the engine does (schedule, then
update_from_output); only the model is replaced: every sequence that completes its tokens in a
step draws token 1000 + its output index.
"""

from __future__ import annotations

import time

import pytest

from pagoda.backend.beam_search import BeamSearchState
from pagoda.backend.errors import InvalidParameter, KVCacheCapacityExceeded
from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.model_output import BeamCandidates, ModelOutput, SampledToken
from pagoda.backend.outputs import RequestMetrics
from pagoda.backend.sampling_params import SamplingParams
from pagoda.backend.scheduler import (
    GROWTH_RATIO_AFTER_PREEMPTION,
    GROWTH_RATIO_DECAY,
    Scheduler,
    SchedulerOutput,
)
from pagoda.backend.sequence import GroupStatus, Sequence, SequenceGroup

FIRST_OUTPUT_TOKEN = 1000


def make_group(
    request_id: str, prompt_len: int, *, n: int = 1, max_tokens: int = 16, first_token: int = 0
) -> SequenceGroup:
    prompt = list(range(first_token, first_token + prompt_len))
    seqs = [
        Sequence(
            index=index,
            token_ids=list(prompt),
            num_prompt_tokens=prompt_len,
            seed=None,
            detokenizer=None,  # the scheduler never touches it
        )
        for index in range(n)
    ]
    return SequenceGroup(
        request_id=request_id,
        prompt=None,
        prompt_token_ids=prompt,
        params=SamplingParams(n=n, max_tokens=max_tokens),
        seqs=seqs,
        metrics=RequestMetrics(arrival_time=time.monotonic()),
    )


def model_output_for(output: SchedulerOutput) -> ModelOutput:
    """What a model would return for the step: every sequence that samples this step (and each
    follower of its prefill) draws token 1000 + its output index."""
    tokens = {}
    for item in output.scheduled:
        if item.samples_next_token:
            for seq in (item.seq, *item.followers):
                tokens[seq.seq_id] = [SampledToken(FIRST_OUTPUT_TOKEN + seq.num_output_tokens,
                                                   logprob=0.0, rank=0, top_logprobs=[])]
    return ModelOutput(tokens=tokens)


class SchedulerLoop:
    """The real scheduler and block manager, stepped with hand-made model outputs."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int = 4,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 64,
        enable_prefix_caching: bool = False,
    ) -> None:
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens,
                                   max_model_len=4096)
        self.finished: list[SequenceGroup] = []

    def add(self, *groups: SequenceGroup) -> None:
        for group in groups:
            self.scheduler.add(group)

    def step(self) -> SchedulerOutput:
        output = self.scheduler.schedule()
        assert output.num_batched_tokens <= self.scheduler.max_num_batched_tokens
        assert sum(1 + len(i.followers) for i in output.scheduled) <= self.scheduler.max_num_seqs
        assert all(item.num_new_tokens > 0 for item in output.scheduled)
        touched = self.scheduler.update_from_output(output, model_output_for(output))
        self.finished.extend(group for group in touched if group.is_finished)
        self.blocks.check_invariants()
        return output

    def run_until_done(self, max_steps: int = 200) -> list[SchedulerOutput]:
        outputs = []
        while self.scheduler.has_unfinished():
            assert len(outputs) < max_steps, "the scheduler made no progress"
            outputs.append(self.step())
        return outputs

    def check_no_leaks(self) -> None:
        assert not self.scheduler.has_unfinished()
        self.blocks.check_invariants()
        assert self.blocks.block_tables == {}
        assert self.blocks.pool.num_used_blocks == 0


def scheduled(output: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id, sample index, tokens this step) for each scheduled sequence, in order."""
    return [
        (item.group.request_id, item.seq.index, item.num_new_tokens) for item in output.scheduled
    ]


def table(loop: SchedulerLoop, group: SequenceGroup, index: int = 0) -> list[int]:
    return loop.blocks.block_ids(group.seqs[index].seq_id)


# -- token budget and chunked prefill ----------------------------------------------------------


def test_long_prompt_is_prefilled_in_budget_sized_chunks() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=16)
    group = make_group("A", 40, max_tokens=3)
    seq = group.seqs[0]
    loop.add(group)

    output = loop.step()
    assert scheduled(output) == [("A", 0, 16)]
    assert seq.num_computed_tokens == 16 and len(seq.token_ids) == 40
    assert table(loop, group) == [0, 1, 2, 3]
    assert group.status is GroupStatus.RUNNING

    assert scheduled(loop.step()) == [("A", 0, 16)]
    assert seq.num_computed_tokens == 32 and len(seq.token_ids) == 40
    assert len(table(loop, group)) == 8

    assert scheduled(loop.step()) == [("A", 0, 8)]  # the last chunk completes the prompt
    assert seq.num_computed_tokens == 40
    assert seq.output_token_ids == [1000]
    assert len(table(loop, group)) == 10

    assert scheduled(loop.step()) == [("A", 0, 1)]  # decodes get one token
    assert len(table(loop, group)) == 11
    assert scheduled(loop.step()) == [("A", 0, 1)]
    assert seq.output_token_ids == [1000, 1001, 1002]
    assert seq.finish_reason == "length"
    assert loop.finished == [group]
    assert group.status is GroupStatus.FINISHED
    loop.check_no_leaks()


def test_samples_next_token_marks_only_the_last_chunk() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=16)
    group = make_group("A", 20)
    loop.add(group)
    first = loop.scheduler.schedule()
    assert [item.samples_next_token for item in first.scheduled] == [False]
    group.seqs[0].num_computed_tokens += 16
    second = loop.scheduler.schedule()
    assert scheduled(second) == [("A", 0, 4)]
    assert [item.samples_next_token for item in second.scheduled] == [True]


def test_running_groups_are_scheduled_before_waiting_ones() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=16)
    first = make_group("A", 6, max_tokens=10)
    loop.add(first)
    assert scheduled(loop.step()) == [("A", 0, 6)]

    second = make_group("B", 30, max_tokens=2, first_token=100)
    loop.add(second)
    # A's decode comes first; B's prefill gets what is left of the budget.
    assert scheduled(loop.step()) == [("A", 0, 1), ("B", 0, 15)]
    assert scheduled(loop.step()) == [("A", 0, 1), ("B", 0, 15)]
    assert second.seqs[0].output_token_ids == [1000]
    assert scheduled(loop.step()) == [("A", 0, 1), ("B", 0, 1)]
    assert second.is_finished
    loop.run_until_done()
    assert first.seqs[0].num_output_tokens == 10
    loop.check_no_leaks()


def test_waiting_groups_get_nothing_when_running_ones_use_the_budget() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=2)
    first = make_group("A", 1, n=2, max_tokens=3)
    loop.add(first)
    assert scheduled(loop.step()) == [("A", 0, 1)]  # one shared prefill for both samples
    second = make_group("B", 1)
    loop.add(second)
    assert scheduled(loop.step()) == [("A", 0, 1), ("A", 1, 1)]
    assert list(loop.scheduler.waiting) == [second]
    assert second.status is GroupStatus.WAITING
    assert second.seqs[0].seq_id not in loop.blocks.block_tables
    loop.run_until_done()
    loop.check_no_leaks()


def test_samples_share_the_prompt_prefill_then_copy_the_last_block_on_write() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=64)
    group = make_group("A", 5, n=3, max_tokens=3)
    loop.add(group)
    output = loop.step()
    assert scheduled(output) == [("A", 0, 5)]
    assert output.scheduled[0].followers == group.seqs[1:]
    # After the shared prefill every sample holds the same two blocks.
    assert [table(loop, group, index) for index in range(3)] == [[0, 1]] * 3
    assert [loop.blocks.pool.blocks[b].ref_count for b in (0, 1)] == [3, 3]
    output = loop.step()
    assert scheduled(output) == [("A", 0, 1), ("A", 1, 1), ("A", 2, 1)]
    # Writing position 5 lands in shared block 1: the first two samples copy it, the last
    # one (now its only owner) writes in place. Block 0 (full) stays shared.
    assert output.block_copies == [(1, 2), (1, 3)]
    assert [table(loop, group, index) for index in range(3)] == [[0, 2], [0, 3], [0, 1]]
    assert loop.blocks.pool.blocks[0].ref_count == 3
    assert loop.blocks.num_copy_on_write == 2
    assert scheduled(loop.step()) == [("A", 0, 1), ("A", 1, 1), ("A", 2, 1)]
    assert all(seq.output_token_ids == [1000, 1001, 1002] for seq in group.seqs)
    loop.check_no_leaks()


def test_shared_prefill_is_chunked_by_the_budget() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=4)
    group = make_group("A", 10, n=2, max_tokens=2)
    loop.add(group)
    assert scheduled(loop.step()) == [("A", 0, 4)]
    assert scheduled(loop.step()) == [("A", 0, 4)]
    assert scheduled(loop.step()) == [("A", 0, 2)]
    assert scheduled(loop.step()) == [("A", 0, 1), ("A", 1, 1)]
    loop.run_until_done()
    assert all(seq.num_output_tokens == 2 for seq in group.seqs)
    loop.check_no_leaks()


def test_multi_sample_prompt_longer_than_the_budget_is_still_scheduled() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_batched_tokens=8)
    group = make_group("A", 8, n=2, max_tokens=2)
    later = make_group("B", 2, max_tokens=1)
    loop.add(group, later)
    loop.run_until_done(max_steps=20)
    assert all(seq.num_output_tokens == 2 for seq in group.seqs)
    assert later.is_finished
    loop.check_no_leaks()


# -- max_num_seqs ------------------------------------------------------------------------------


def test_max_num_seqs_limits_admission() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_seqs=2)
    groups = [make_group(name, 4, max_tokens=2) for name in "ABC"]
    loop.add(*groups)
    assert scheduled(loop.step()) == [("A", 0, 4), ("B", 0, 4)]
    assert list(loop.scheduler.waiting) == [groups[2]]
    assert scheduled(loop.step()) == [("A", 0, 1), ("B", 0, 1)]
    assert loop.finished == groups[:2]
    assert scheduled(loop.step()) == [("C", 0, 4)]
    loop.run_until_done()
    loop.check_no_leaks()


def test_max_num_seqs_counts_every_sample_of_a_group() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_seqs=3)
    first = make_group("A", 4, n=2, max_tokens=2)
    second = make_group("B", 4, n=2, max_tokens=1)
    loop.add(first, second)
    assert scheduled(loop.step()) == [("A", 0, 4)]  # B's two samples would make four
    assert list(loop.scheduler.waiting) == [second]
    assert scheduled(loop.step()) == [("A", 0, 1), ("A", 1, 1)]
    assert scheduled(loop.step()) == [("B", 0, 4)]
    loop.check_no_leaks()


def test_group_with_more_samples_than_max_num_seqs_fails_instead_of_blocking() -> None:
    loop = SchedulerLoop(num_blocks=64, max_num_seqs=2)
    too_wide = make_group("A", 4, n=3)
    later = make_group("B", 4, max_tokens=1)
    loop.add(too_wide, later)
    output = loop.step()
    assert output.failed == [too_wide]
    assert isinstance(too_wide.error, InvalidParameter) and too_wide.error.field == "n"
    assert scheduled(output) == [("B", 0, 4)]


# -- preemption --------------------------------------------------------------------------------


def test_the_last_arrived_running_group_is_preempted_and_later_resumes() -> None:
    loop = SchedulerLoop(num_blocks=6, max_num_batched_tokens=64)
    first = make_group("A", 8, max_tokens=6)
    second = make_group("B", 8, max_tokens=8, first_token=100)
    loop.add(first, second)
    assert scheduled(loop.step()) == [("A", 0, 8), ("B", 0, 8)]
    assert table(loop, first) == [0, 1] and table(loop, second) == [2, 3]

    third = make_group("C", 8, max_tokens=1, first_token=200)
    loop.add(third)
    output = loop.step()  # each decode takes a third block: the pool is full
    assert scheduled(output) == [("A", 0, 1), ("B", 0, 1)]
    assert table(loop, first) == [0, 1, 4] and table(loop, second) == [2, 3, 5]
    assert loop.blocks.num_free_blocks == 0
    assert list(loop.scheduler.waiting) == [third]

    for _ in range(3):  # positions 9..11 fit the third blocks
        output = loop.step()
        assert scheduled(output) == [("A", 0, 1), ("B", 0, 1)]
        assert output.preempted == []
    assert loop.scheduler.num_preemptions == 0

    # A's 13th token needs a fourth block: B, the last to arrive, gives its blocks up.
    output = loop.step()
    assert output.preempted == [second]
    assert scheduled(output) == [("A", 0, 1)]
    assert loop.scheduler.num_preemptions == 1
    assert loop.scheduler.running == []  # A finished in this step
    assert list(loop.scheduler.waiting) == [second, third]
    assert second.status is GroupStatus.WAITING
    b_seq = second.seqs[0]
    assert b_seq.num_computed_tokens == 0
    assert b_seq.seq_id not in loop.blocks.block_tables
    assert b_seq.output_token_ids == [1000, 1001, 1002, 1003, 1004]  # kept for recompute
    assert first.seqs[0].output_token_ids == list(range(1000, 1006))
    # B's blocks went back last first, A took the head; then A finished and freed its own.
    assert [block.block_id for block in loop.blocks.pool.free_queue] == [3, 2, 5, 4, 1, 0]

    # No admission in a step that preempted; the next step recomputes B ahead of C.
    output = loop.step()
    assert scheduled(output) == [("B", 0, 13), ("C", 0, 8)]
    assert table(loop, second) == [3, 2, 5, 4]
    assert b_seq.output_token_ids == list(range(1000, 1006))

    loop.run_until_done()
    assert b_seq.output_token_ids == list(range(1000, 1008))
    assert third.seqs[0].output_token_ids == [1000]
    assert loop.scheduler.num_preemptions == 1
    loop.check_no_leaks()


def test_no_admission_in_a_step_that_preempts() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=64)
    first = make_group("A", 4, max_tokens=8)
    second = make_group("B", 4, max_tokens=8, first_token=100)
    loop.add(first, second)
    loop.step()
    loop.step()  # both take a second block
    tiny = make_group("C", 1, max_tokens=1, first_token=200)
    loop.add(tiny)
    for _ in range(3):
        output = loop.step()
    assert output.preempted == []
    output = loop.step()  # A needs a third block: B is preempted
    assert output.preempted == [second]
    assert scheduled(output) == [("A", 0, 1)]
    # C would fit in B's freed blocks, but waits behind B.
    assert list(loop.scheduler.waiting) == [second, tiny]
    loop.run_until_done()
    loop.check_no_leaks()


def test_preempting_several_groups_keeps_the_waiting_queue_in_arrival_order() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=64)
    first = make_group("A", 4, n=3, max_tokens=3)
    second = make_group("B", 4, max_tokens=3, first_token=100)
    third = make_group("C", 4, max_tokens=3, first_token=200)
    loop.add(first, second, third)
    assert scheduled(loop.step()) == [("A", 0, 4), ("B", 0, 4), ("C", 0, 4)]
    assert loop.blocks.num_free_blocks == 1

    # A's three samples each need a second block (one free): C, then B, are preempted.
    output = loop.step()
    assert output.preempted == [third, second]
    assert scheduled(output) == [("A", 0, 1), ("A", 1, 1), ("A", 2, 1)]
    assert list(loop.scheduler.waiting) == [second, third]
    assert loop.scheduler.num_preemptions == 2

    output = loop.step()  # B and C still do not fit
    assert scheduled(output) == [("A", 0, 1), ("A", 1, 1), ("A", 2, 1)]
    assert first.is_finished

    output = loop.step()
    assert scheduled(output) == [("B", 0, 5), ("C", 0, 5)]
    loop.run_until_done()
    assert second.seqs[0].output_token_ids == [1000, 1001, 1002]
    assert third.seqs[0].output_token_ids == [1000, 1001, 1002]
    loop.check_no_leaks()


def test_admission_keeps_a_watermark_of_free_blocks_while_others_run() -> None:
    # 200 blocks: the 1% watermark is 2 blocks.
    for prompt_len, admitted in ((32, True), (33, False)):
        loop = SchedulerLoop(num_blocks=200, max_num_batched_tokens=1024)
        first = make_group("A", 759, max_tokens=4)
        loop.add(first)
        loop.step()
        assert len(table(loop, first)) == 190
        second = make_group("B", prompt_len, first_token=5000)
        loop.add(second)
        output = loop.step()
        assert loop.blocks.num_free_blocks == (10 - 8 if admitted else 10)
        assert (second in loop.scheduler.running) is admitted
        assert len(output.scheduled) == (2 if admitted else 1)


# -- room to grow after a preemption -----------------------------------------------------------


def test_a_preemption_turns_on_the_growth_reserve_which_then_decays() -> None:
    loop = SchedulerLoop(num_blocks=6)
    loop.add(make_group("A", 8, max_tokens=20), make_group("B", 8, max_tokens=20, first_token=50))
    assert loop.scheduler.growth_ratio == 0.0  # as vLLM: free blocks alone, until it misfires
    outputs = [loop.step()]
    while not outputs[-1].preempted:
        outputs.append(loop.step())
    assert loop.scheduler.growth_ratio == GROWTH_RATIO_AFTER_PREEMPTION
    assert not any(output.preempted for output in outputs[:-1])
    loop.step()
    assert loop.scheduler.growth_ratio == pytest.approx(
        GROWTH_RATIO_AFTER_PREEMPTION - GROWTH_RATIO_DECAY
    )
    loop.run_until_done()
    loop.check_no_leaks()


@pytest.mark.parametrize(("growth_ratio", "admitted"), [(0.0, True), (0.5, False)])
def test_admission_keeps_room_for_the_running_requests_to_grow(growth_ratio, admitted) -> None:
    loop = SchedulerLoop(num_blocks=8)
    first = make_group("A", 8, max_tokens=35)
    loop.add(first)
    loop.step()  # A's prompt: 2 blocks, and its first token
    loop.scheduler.growth_ratio = growth_ratio
    loop.add(make_group("B", 8, first_token=50))
    loop.step()
    # A holds 3 blocks for 9 tokens; of its 34 tokens to come, about half (16) are expected: 25
    # tokens, 7 blocks, so 4 more. B's prompt needs 2 of the 5 free blocks, which leaves 3.
    assert len(table(loop, first)) == 3
    assert (len(loop.scheduler.running) == 2) is admitted


# -- failure -----------------------------------------------------------------------------------


def test_a_group_larger_than_the_pool_fails_at_admission_at_once() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=64)
    small = make_group("A", 4, max_tokens=2)
    loop.add(small)
    loop.step()
    huge = make_group("B", 20, first_token=100)  # 5 blocks; the pool has 4
    later = make_group("C", 4, max_tokens=1, first_token=200)
    loop.add(huge, later)

    output = loop.step()  # B can never fit: it fails without waiting; C goes ahead
    assert output.failed == [huge]
    assert scheduled(output) == [("A", 0, 1), ("C", 0, 4)]
    assert huge.status is GroupStatus.FINISHED
    assert huge.seqs[0].finish_reason == "error"
    assert isinstance(huge.error, KVCacheCapacityExceeded)
    assert (huge.error.num_blocks_needed, huge.error.num_blocks_total) == (5, 4)
    assert "5 KV blocks" in str(huge.error) and "has 4" in str(huge.error)
    assert huge not in loop.scheduler.waiting and huge not in loop.scheduler.running
    assert huge.seqs[0].seq_id not in loop.blocks.block_tables
    assert loop.blocks.pool.num_evictions == 0

    loop.run_until_done()
    assert small.seqs[0].output_token_ids == [1000, 1001]
    assert later.seqs[0].output_token_ids == [1000]
    assert later.error is None
    loop.check_no_leaks()


def test_check_fits_counts_every_token_max_tokens_allows() -> None:
    loop = SchedulerLoop(num_blocks=16)  # blocks of 4 tokens
    # Two samples of a 10-token prompt share its 2 full blocks; the rest is each sample's own.
    loop.scheduler.check_fits(make_group("A", 10, n=2, max_tokens=15))  # 2 + 2 x 5 blocks
    too_large = make_group("B", 10, n=2, max_tokens=30)  # 2 + 2 x 8 blocks
    with pytest.raises(KVCacheCapacityExceeded) as caught:
        loop.scheduler.check_fits(too_large)
    error = caught.value
    assert (error.num_blocks_needed, error.num_blocks_total, error.block_size) == (18, 16, 4)
    # max_tokens 26 is the most that fits (2 + 2 x 7 blocks): 10 + 26 x 2 tokens.
    assert error.max_request_tokens == 62
    assert "at most 62 tokens" in str(error)
    assert not loop.scheduler.has_unfinished() and loop.blocks.pool.num_used_blocks == 0


def test_check_fits_without_max_tokens_counts_only_the_tokens_now() -> None:
    loop = SchedulerLoop(num_blocks=16)
    open_ended = make_group("A", 10, n=2)
    open_ended.params.max_tokens = None  # may generate up to max_model_len, or stop at once
    loop.scheduler.check_fits(open_ended)
    huge = make_group("B", 70)
    huge.params.max_tokens = None
    with pytest.raises(KVCacheCapacityExceeded) as caught:
        loop.scheduler.check_fits(huge)
    assert caught.value.num_blocks_needed == 18 and caught.value.max_request_tokens is None
    with pytest.raises(InvalidParameter) as too_wide:
        loop.scheduler.check_fits(make_group("C", 4, n=9))  # max_num_seqs is 8
    assert too_wide.value.field == "n"


def test_a_sequence_that_outgrows_the_pool_while_alone_fails() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=8)
    group = make_group("A", 16, max_tokens=10)  # the prompt fills all 4 blocks
    loop.add(group)
    assert scheduled(loop.step()) == [("A", 0, 8)]
    assert scheduled(loop.step()) == [("A", 0, 8)]
    assert loop.blocks.num_free_blocks == 0
    output = loop.step()  # its first decode needs a fifth block
    assert output.failed == [group]
    assert output.scheduled == [] and output.preempted == []
    assert loop.scheduler.num_preemptions == 0
    assert isinstance(group.error, KVCacheCapacityExceeded) and "num_kv_blocks" in str(group.error)
    assert group.seqs[0].finish_reason == "error"
    loop.check_no_leaks()


def test_a_group_that_outgrows_the_pool_preempts_itself_until_alone_then_fails() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=8)
    small = make_group("D", 4, max_tokens=6)
    grower = make_group("A", 12, max_tokens=10, first_token=100)  # fits, then outgrows the pool
    loop.add(small, grower)
    outputs = loop.run_until_done()

    failed_at = next(step for step, output in enumerate(outputs) if output.failed)
    assert outputs[failed_at].failed == [grower]
    # The grower, the last to arrive, preempts itself; the small one never stops.
    assert all(output.preempted in ([], [grower]) for output in outputs)
    assert loop.scheduler.num_preemptions >= 1
    assert small.seqs[0].output_token_ids == list(range(1000, 1006))
    assert small.error is None
    assert grower.error is not None and grower.seqs[0].finish_reason == "error"
    loop.check_no_leaks()


# -- finish ------------------------------------------------------------------------------------


def test_finish_frees_the_blocks_of_a_running_group() -> None:
    loop = SchedulerLoop(num_blocks=16, max_num_batched_tokens=8)
    group = make_group("A", 20)
    loop.add(group)
    loop.step()
    loop.step()
    assert loop.blocks.pool.num_used_blocks > 0
    loop.scheduler.finish(group)  # an abort, mid-prefill
    assert group.status is GroupStatus.FINISHED
    assert loop.scheduler.running == []
    loop.check_no_leaks()


def test_finish_removes_a_waiting_group() -> None:
    loop = SchedulerLoop(num_blocks=16, max_num_seqs=1)
    first = make_group("A", 4, max_tokens=2)
    second = make_group("B", 4)
    loop.add(first, second)
    loop.step()
    assert list(loop.scheduler.waiting) == [second]
    loop.scheduler.finish(second)
    assert list(loop.scheduler.waiting) == []
    assert second.status is GroupStatus.FINISHED
    loop.run_until_done()
    loop.check_no_leaks()


# -- prefix caching through the scheduler ------------------------------------------------------


def test_admission_skips_the_cached_prefix() -> None:
    loop = SchedulerLoop(num_blocks=16, max_num_batched_tokens=64, enable_prefix_caching=True)
    first = make_group("A", 10, max_tokens=1)
    loop.add(first)
    assert scheduled(loop.step()) == [("A", 0, 10)]
    assert first.is_finished
    second = make_group("B", 10, max_tokens=1)
    loop.add(second)
    output = loop.step()
    assert scheduled(output) == [("B", 0, 2)]  # two cached blocks hit
    assert loop.blocks.prefix_cache_hits == 2
    loop.check_no_leaks()


def test_prefix_cache_hits_are_counted_once_per_admitted_request() -> None:
    loop = SchedulerLoop(num_blocks=5, max_num_batched_tokens=64, enable_prefix_caching=True)
    loop.add(make_group("A", 8, max_tokens=1))
    loop.step()  # blocks 0 and 1 cached
    loop.add(make_group("R", 4, max_tokens=6, first_token=500))
    loop.step()
    # B hits A's two blocks but needs two more; only one is free until R finishes.
    second = make_group("B", 13, max_tokens=1)
    loop.add(second)
    loop.run_until_done()
    assert second.seqs[0].output_token_ids == [1000]
    # Counted once per admission, in blocks: A looked up (8 - 1) // 4 = 1, B (13 - 1) // 4 = 3.
    assert loop.blocks.prefix_cache_hits == 2
    assert loop.blocks.prefix_cache_queries == 4


def test_a_preempted_group_with_prefix_caching_resumes_from_its_cached_blocks() -> None:
    loop = SchedulerLoop(num_blocks=4, max_num_batched_tokens=64, enable_prefix_caching=True)
    first = make_group("A", 4, max_tokens=6)
    second = make_group("B", 4, max_tokens=8, first_token=100)
    loop.add(first, second)
    for _ in range(5):
        loop.step()
    assert table(loop, first) == [0, 2] and table(loop, second) == [1, 3]
    assert loop.blocks.pool.num_evictions == 0

    # A needs a third block: B is preempted and A takes B's last block, evicting it from the
    # cache; B's first block stays cached.
    output = loop.step()
    assert output.preempted == [second]
    assert loop.blocks.pool.num_evictions == 1
    assert first.is_finished

    # B (9 tokens) recomputes only what the cache lost: its first block is a hit.
    output = loop.step()
    assert scheduled(output) == [("B", 0, 5)]
    assert loop.blocks.prefix_cache_hits == 1
    assert table(loop, second) == [1, 3, 2]
    loop.run_until_done()
    assert loop.scheduler.num_preemptions == 1
    assert first.seqs[0].output_token_ids == list(range(1000, 1006))
    assert second.seqs[0].output_token_ids == list(range(1000, 1008))
    loop.check_no_leaks()


# -- applying a step's output -----------------------------------------------------------------


def sampled(token_id: int) -> SampledToken:
    return SampledToken(token_id, logprob=-0.5, rank=1, top_logprobs=[])


def test_update_appends_several_tokens_and_stops_at_the_first_stop_token() -> None:
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, 8, 64, max_model_len=4096, eos_token_ids=[7])
    group, other = make_group("A", 6, max_tokens=10), make_group("B", 3, max_tokens=10)
    scheduler.add(group)
    scheduler.add(other)
    output = scheduler.schedule()
    seq = group.seqs[0]
    # Speculative decoding accepts several tokens at once; those after a stop are dropped.
    model_output = ModelOutput(tokens={
        seq.seq_id: [sampled(5), sampled(7), sampled(9)],
        other.seqs[0].seq_id: [sampled(4)],
    })
    touched = scheduler.update_from_output(output, model_output)
    assert touched == [group, other]
    assert seq.output_token_ids == [5, 7] and seq.finish_reason == "stop"
    assert seq.cumulative_logprob == pytest.approx(-1.0)
    assert seq.num_computed_tokens == 6 and seq.seq_id not in blocks.block_tables
    assert group.status is GroupStatus.FINISHED and scheduler.running == [other]
    assert other.seqs[0].output_token_ids == [4] and not other.is_finished
    scheduler.finish(other)  # an abort
    assert blocks.block_tables == {} and blocks.pool.num_used_blocks == 0


def test_update_forks_the_samples_of_a_shared_prefill_and_frees_each_as_it_stops() -> None:
    blocks = BlockManager(16, 4, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, 8, 64, max_model_len=4096, eos_token_ids=[7])
    group = make_group("A", 9, n=3, max_tokens=10)
    scheduler.add(group)
    output = scheduler.schedule()
    (item,) = output.scheduled
    lead, second, third = group.seqs
    assert item.seq is lead and item.followers == [second, third]
    scheduler.update_from_output(output, ModelOutput(tokens={
        lead.seq_id: [sampled(4)], second.seq_id: [sampled(7)], third.seq_id: [sampled(5)],
    }))
    # The samples share the prompt's two full blocks; the one that drew EOS holds none.
    assert blocks.block_ids(third.seq_id)[:2] == blocks.block_ids(lead.seq_id)[:2]
    assert second.is_finished and second.seq_id not in blocks.block_tables
    assert [s.num_computed_tokens for s in group.seqs] == [9, 9, 9]
    assert not group.is_finished
    scheduler.finish(group)  # an abort
    blocks.check_invariants()
    assert blocks.block_tables == {} and blocks.pool.num_used_blocks == 0


def test_beam_candidates_fork_and_free_beams_through_the_scheduler() -> None:
    blocks = BlockManager(16, 4, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, 8, 64, max_model_len=4096)
    group = make_group("A", 8, n=2, max_tokens=2)
    group.params = SamplingParams(n=2, max_tokens=2, temperature=0.0, use_beam_search=True)
    group.beam = BeamSearchState(width=2, length_penalty=1.0, early_stopping=False,
                                 max_new_tokens=2, stop_token_ids=frozenset())
    scheduler.add(group)
    output = scheduler.schedule()
    (item,) = output.scheduled
    lead = item.seq
    touched = scheduler.update_from_output(output, ModelOutput(beam_candidates={
        lead.seq_id: BeamCandidates([10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4]),
    }))
    assert touched == []  # a beam search reports only when it is done
    first, second = group.seqs
    assert first is lead and second.seq_id != lead.seq_id
    assert [first.output_token_ids, second.output_token_ids] == [[10], [11]]
    assert blocks.block_ids(second.seq_id) == blocks.block_ids(first.seq_id)  # forked, shared
    output = scheduler.schedule()
    assert [i.seq for i in output.scheduled] == [first, second]
    touched = scheduler.update_from_output(output, ModelOutput(beam_candidates={
        first.seq_id: BeamCandidates([20, 21, 22, 23], [-1.0, -2.0, -3.0, -4.0]),
        second.seq_id: BeamCandidates([30, 31, 32, 33], [-0.5, -3.0, -3.5, -4.5]),
    }))
    assert touched == [group] and group.is_finished
    assert [h.output_token_ids for h in group.beam_results] == [[11, 30], [10, 20]]
    assert blocks.block_tables == {} and blocks.pool.num_used_blocks == 0
    assert scheduler.running == []


# -- a mixed workload --------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
def test_mixed_workload_runs_to_completion_without_leaks(enable_prefix_caching: bool) -> None:
    loop = SchedulerLoop(
        num_blocks=9,
        max_num_seqs=4,
        max_num_batched_tokens=10,
        enable_prefix_caching=enable_prefix_caching,
    )
    groups = [
        make_group("A", 13, max_tokens=5),
        make_group("B", 3, n=2, max_tokens=4),
        make_group("C", 13, max_tokens=3),  # same prompt as A
        make_group("D", 7, max_tokens=6, first_token=50),
        make_group("E", 30, max_tokens=2, first_token=80),
    ]
    loop.add(*groups)
    loop.run_until_done()
    for group in groups:
        assert group.error is None
        assert all(
            seq.output_token_ids == list(range(1000, 1000 + group.params.max_tokens))
            for seq in group.seqs
        )
    assert loop.scheduler.num_preemptions > 0  # the pool is small enough to force some
    loop.check_no_leaks()
