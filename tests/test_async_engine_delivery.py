"""AsyncEngine's hand-off of outputs: with newest_only, a reader that falls behind gets the newest
output, never a backlog; without it, every output."""

from __future__ import annotations

import asyncio
import time

from pagoda.backend import LLMEngine, SamplingParams
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig


async def _wait_until_idle(engine: AsyncEngine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish in time"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # let the last hand-off reach the event loop


def test_slow_reader_skips_to_the_newest_output(demo_model_dir):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64)))
    engine.start()

    async def read_all_slowly() -> list:
        outputs = []
        async for output in engine.generate("all", [1, 7, 9], params):
            outputs.append(output)
            if len(outputs) == 1:
                await _wait_until_idle(engine)
        return outputs

    async def read_fast() -> list:
        return [output async for output in engine.generate("fast", [1, 7, 9], params)]

    async def read_slow() -> list:
        outputs = []
        async for output in engine.generate("slow", [1, 7, 9], params, newest_only=True):
            outputs.append(output)
            if len(outputs) == 1:
                await _wait_until_idle(engine)
        return outputs

    try:
        fast = asyncio.run(read_fast())
        slow = asyncio.run(read_slow())
        every = asyncio.run(read_all_slowly())
    finally:
        engine.shutdown()
    engine.engine.check_no_leaks()
    assert len(fast[-1].outputs[0].token_ids) == 24
    # Every output the slow reader missed was replaced by the next: it gets the final one only
    # (or nothing but it, had the whole request run before its first read).
    assert len(slow) in (1, 2)
    assert slow[-1].finished and slow[-1].outputs[0].finish_reason == "length"
    assert slow[-1].outputs[0].token_ids == fast[-1].outputs[0].token_ids
    assert slow[-1].outputs[0].text == fast[-1].outputs[0].text
    # Without newest_only, a late reader still gets one output per generated token.
    assert [len(o.outputs[0].token_ids) for o in every] == list(range(1, 25))

