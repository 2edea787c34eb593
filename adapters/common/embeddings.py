"""Embedding requests as both adapters send them: every input an engine request of its own, all
in flight at once (the scheduler batches them), and vectors as base64 float32 when asked."""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from pagoda.backend.engine_client import EngineClient, PoolingParams, Prompt
from pagoda.backend.outputs import RequestOutput


async def embed_prompts(
    client: EngineClient, request_id: str, prompts: list[Prompt]
) -> list[RequestOutput]:
    """Each prompt's final output with its embedding, in order. The first engine error is
    raised, and the other requests are aborted (as they are when the caller is cancelled)."""
    tasks = [
        asyncio.ensure_future(client.embed(f"{request_id}-{index}", prompt, PoolingParams()))
        for index, prompt in enumerate(prompts)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done


def base64_float32(vector: list[float]) -> str:
    """OpenAI's (and FastChat's) base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
