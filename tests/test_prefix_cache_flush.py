"""Flushing the prefix cache (POST /flush_cache's engine side): blocks nobody holds are forgotten,
blocks in use stay, and requests running across a flush give the tokens they give without one."""

from __future__ import annotations

import asyncio

import pytest

from pagoda.backend import LLMEngine, SamplingParams
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig
from pagoda.backend.engine_client import EngineClient
from pagoda.backend.errors import RequestFailed
from pagoda.backend.kv.block_manager import BlockManager, PrefixCacheFlush
from test_block_manager import BLOCK_SIZE, FakeSeq, free_ids, run_and_cache
from test_sharing import random_prompt


def cached_ids(manager: BlockManager) -> list[int]:
    return sorted(block.block_id for block in manager.pool.cached.values())


def test_flush_drops_free_cached_blocks_and_keeps_those_in_use() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    first = FakeSeq(0, list(range(40)))  # blocks 0, 1 full (cached), 2 partial
    run_and_cache(manager, first)
    second = FakeSeq(1, [500 + i for i in range(33)])  # blocks 3, 4 full, 5 partial
    run_and_cache(manager, second)
    manager.free(first)
    assert cached_ids(manager) == [0, 1, 3, 4]
    assert free_ids(manager) == [6, 7, 8, 9, 2, 1, 0]

    assert manager.flush_prefix_cache() == PrefixCacheFlush(num_dropped_blocks=2,
                                                            num_kept_blocks=2)
    # The freed blocks stay where they were in the free queue, empty now; the running
    # sequence's blocks and keys are untouched.
    assert cached_ids(manager) == [3, 4]
    assert free_ids(manager) == [6, 7, 8, 9, 2, 1, 0]
    assert all(manager.pool.blocks[block_id].key is None for block_id in (0, 1, 2))
    assert manager.block_ids(1) == [3, 4, 5]
    manager.check_invariants()

    # What was flushed no longer matches; what was kept still does.
    assert manager.match_prefix(FakeSeq(2, list(range(40)))) == 0
    assert manager.match_prefix(FakeSeq(3, [500 + i for i in range(40)])) == 32
    assert manager.block_ids(3) == [3, 4]
    for seq_id in (1, 2, 3):
        manager.free(FakeSeq(seq_id))
    assert manager.pool.num_used_blocks == 0
    manager.check_invariants()


def test_a_sequence_running_across_a_flush_keeps_publishing_its_blocks() -> None:
    manager = BlockManager(10, BLOCK_SIZE, enable_prefix_caching=True)
    seq = FakeSeq(0, list(range(20)))
    run_and_cache(manager, seq)  # block 0 cached, block 1 holds 4 tokens
    assert manager.flush_prefix_cache() == PrefixCacheFlush(0, 1)
    seq.token_ids += list(range(20, 32))
    assert manager.allocate_slots(seq, 12)
    seq.num_computed_tokens = 32
    manager.cache_computed_blocks(seq)  # block 1 is full now: chained to block 0's key
    assert cached_ids(manager) == [0, 1]
    manager.free(seq)
    later = FakeSeq(1, list(range(40)))
    assert manager.match_prefix(later) == 32
    manager.free(later)
    manager.check_invariants()


def test_flush_with_caching_off_drops_nothing() -> None:
    manager = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    run_and_cache(manager, FakeSeq(0, list(range(40))))
    assert manager.flush_prefix_cache() == PrefixCacheFlush(0, 0)


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id] = output.outputs[0].token_ids
    return tokens


def test_engine_flush_between_steps_changes_no_token_and_leaks_nothing(demo_model_dir) -> None:
    prefix = random_prompt(100, 3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = {"a": prefix + [7, 8, 9], "b": prefix + [10, 11]}
    reference = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    for request_id, prompt in prompts.items():
        reference.add_request(request_id, prompt, params)
    expected = run_to_end(reference)

    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    engine.add_request("warm", prefix + [3], SamplingParams(max_tokens=1))
    run_to_end(engine)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    engine.step()  # both prefilled from the warm request's 6 cached blocks, now decoding
    assert engine.block_manager.prefix_cache_hits == 12
    flushed = engine.flush_prefix_cache()
    # The only cached blocks are the 6 of the prefix, held by both requests: all kept (the warm
    # request's partial tail block was never cached).
    assert flushed == PrefixCacheFlush(num_dropped_blocks=0, num_kept_blocks=6)
    assert run_to_end(engine) == expected
    engine.check_no_leaks()
    # Once the requests are done, a flush drops those 6 and the 7th block each one filled
    # (103 + 11 and 102 + 11 computed tokens: 7 full blocks of 16).
    assert engine.flush_prefix_cache() == PrefixCacheFlush(num_dropped_blocks=8,
                                                           num_kept_blocks=0)
    engine.add_request("after", prefix + [12], SamplingParams(max_tokens=1))
    run_to_end(engine)
    assert engine.block_manager.prefix_cache_hits == 12  # no new hit: the cache was empty
    engine.check_no_leaks()


@pytest.fixture
def async_engine(demo_model_dir):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64)))
    engine.start()
    yield engine
    engine.shutdown()
    engine.engine.check_no_leaks()


def test_flushes_while_requests_stream_change_no_token(async_engine, demo_model_dir) -> None:
    client = EngineClient(async_engine)
    prefix = random_prompt(64, 5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [prefix + [20 + i] for i in range(4)]
    reference = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    for index, prompt in enumerate(prompts):
        reference.add_request(str(index), prompt, params)
    expected = run_to_end(reference)

    async def generate(request_id: str, prompt: list[int]) -> list[int]:
        async for output in client.generate(request_id, prompt, params):
            final = output
        return final.outputs[0].token_ids

    async def flush_repeatedly(streams: asyncio.Future) -> list[PrefixCacheFlush]:
        flushes = []
        while not streams.done():
            flushes.append(await client.flush_prefix_cache())
            await asyncio.sleep(0.01)
        return flushes

    async def main() -> tuple[list[list[int]], list[PrefixCacheFlush]]:
        streams = asyncio.gather(*(generate(str(i), p) for i, p in enumerate(prompts)))
        flushes = await flush_repeatedly(streams)
        return await streams, flushes

    tokens, flushes = asyncio.run(main())
    assert {str(i): t for i, t in enumerate(tokens)} == expected
    assert len(flushes) > 1  # some landed while the requests ran
    # Every request finished before its last output was delivered: nothing holds a block now.
    assert asyncio.run(client.flush_prefix_cache()).num_kept_blocks == 0
    assert not async_engine.engine.block_manager.pool.cached


def test_flush_on_a_stopped_engine_is_a_request_failure(demo_model_dir) -> None:
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=16)))
    client = EngineClient(engine)
    with pytest.raises(RequestFailed, match="not running"):
        asyncio.run(client.flush_prefix_cache())
    engine.start()
    assert asyncio.run(client.flush_prefix_cache()) == PrefixCacheFlush(0, 0)
    engine.shutdown()
    with pytest.raises(RequestFailed, match="not running"):
        asyncio.run(client.flush_prefix_cache())
    engine.engine.check_no_leaks()
