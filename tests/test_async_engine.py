"""AsyncEngine: concurrent streams, rejection, cancellation and shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagoda.backend import LLMEngine, SamplingParams
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig
from pagoda.backend.errors import InvalidParameter, RequestFailed


@pytest.fixture
def async_engine(demo_model_dir):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64)))
    engine.start()
    yield engine
    engine.shutdown()
    engine.engine.check_no_leaks()


async def collect(engine: AsyncEngine, request_id: str, prompt, params) -> list:
    return [output async for output in engine.generate(request_id, prompt, params)]


def test_concurrent_streams_match_offline_results(async_engine, demo_model_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1, 10 + i, 20 + i, 30] for i in range(8)]

    async def main():
        return await asyncio.gather(
            *(collect(async_engine, f"r{i}", p, params) for i, p in enumerate(prompts))
        )

    streams = asyncio.run(main())
    offline = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    for index, (prompt, outputs) in enumerate(zip(prompts, streams)):
        offline.add_request("x", prompt, params)
        while offline.has_unfinished_requests():
            (final,) = offline.step() or [None]
        assert outputs[-1].finished
        assert outputs[-1].outputs[0].token_ids == final.outputs[0].token_ids, index
        texts = [o.outputs[0].text for o in outputs]
        assert all(after.startswith(before) for before, after in zip(texts, texts[1:]))


def test_rejected_request_raises_and_others_continue(async_engine):
    async def main():
        with pytest.raises(InvalidParameter, match="empty") as caught:
            await collect(async_engine, "bad", [], SamplingParams())
        assert caught.value.field == "prompt"
        return await collect(async_engine, "good", [1, 5], SamplingParams(max_tokens=3))

    outputs = asyncio.run(main())
    assert outputs[-1].finished


def test_a_bug_while_queueing_fails_that_request_not_the_engine(async_engine, monkeypatch):
    def broken_add_request(*args, **kwargs):
        raise TypeError("a bug")

    async def main():
        with monkeypatch.context() as patch:
            patch.setattr(async_engine.engine, "add_request", broken_add_request)
            with pytest.raises(RequestFailed, match="TypeError: a bug") as caught:
                await collect(async_engine, "bad", [1, 5], SamplingParams())
            assert caught.value.internal
        return await collect(async_engine, "good", [1, 5], SamplingParams(max_tokens=3))

    outputs = asyncio.run(main())
    assert outputs[-1].finished and async_engine.is_running


def test_cancelled_stream_aborts_and_frees_blocks(async_engine):
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)

    async def main():
        async def consume():
            async for _ in async_engine.generate("long", [1, 2, 3], params):
                pass

        task = asyncio.create_task(consume())
        while async_engine.snapshot.num_kv_blocks_used == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while async_engine.snapshot.num_running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert async_engine.snapshot.num_running == 0
    assert async_engine.snapshot.num_kv_blocks_used == 0
