"""AsyncEngine's hand-off of outputs: a reader that falls behind gets what it missed merged into
one output (the newest snapshot, or the deltas concatenated), never a backlog."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from pagoda.backend import LLMEngine, SamplingParams
from pagoda.backend.async_engine import AsyncEngine
from pagoda.backend.config import EngineConfig
from pagoda.backend.sampling_params import RequestOutputKind


async def _wait_until_idle(engine: AsyncEngine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish in time"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # let the last hand-off reach the event loop


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_slow_reader_gets_what_it_missed_as_one_output(demo_model_dir, kind):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64)))
    engine.start()

    async def read_fast() -> list:
        return [output async for output in engine.generate("fast", [1, 7, 9], params)]

    async def read_slow() -> list:
        outputs = []
        slow_params = dataclasses.replace(params, output_kind=kind)
        async for output in engine.generate("slow", [1, 7, 9], slow_params):
            outputs.append(output)
            if len(outputs) == 1:
                await _wait_until_idle(engine)
        return outputs

    try:
        fast = asyncio.run(read_fast())
        slow = asyncio.run(read_slow())
    finally:
        engine.shutdown()
    engine.engine.check_no_leaks()
    whole = fast[-1].outputs[0]
    assert len(whole.token_ids) == 24
    # Everything after the first read arrived while the reader slept: one output holds it
    # (or the first read already got the whole request).
    assert len(slow) in (1, 2)
    assert slow[-1].finished and slow[-1].outputs[0].finish_reason == "length"
    if kind is RequestOutputKind.DELTA:
        assert [t for o in slow for t in o.outputs[0].token_ids] == whole.token_ids
        assert "".join(o.outputs[0].text for o in slow) == whole.text
        assert [p for o in slow for p in o.outputs[0].logprobs] == whole.logprobs
    else:
        assert slow[-1].outputs[0] == whole
