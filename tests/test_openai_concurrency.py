"""Many concurrent streams through the OpenAI-compatible server, while it keeps answering."""

from __future__ import annotations

import asyncio

import httpx
from openai import AsyncOpenAI

NUM_STREAMS = 32


def test_concurrent_streams_equal_their_greedy_results(openai_server):
    async def main():
        client = AsyncOpenAI(
            base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0, timeout=120
        )
        requests = [
            {"model": openai_server.model, "temperature": 0, "max_tokens": 24,
             "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}
            for i in range(NUM_STREAMS)
        ]

        async def streamed(request: dict) -> tuple[str, str | None]:
            text, finish_reason = "", None
            async for chunk in await client.chat.completions.create(**request, stream=True):
                choice = chunk.choices[0]
                text += choice.delta.content or ""
                finish_reason = choice.finish_reason or finish_reason
            return text, finish_reason

        async def plain(request: dict) -> tuple[str, str | None]:
            choice = (await client.chat.completions.create(**request)).choices[0]
            return choice.message.content, choice.finish_reason

        streams = asyncio.gather(*(streamed(r) for r in requests))
        async with httpx.AsyncClient(base_url=openai_server.base_url,
                                     headers=openai_server.headers) as http:
            # The engine computes on its own thread: the event loop answers at once meanwhile.
            while "pagoda_num_requests_running 0.0" in (await http.get("/metrics")).text:
                await asyncio.sleep(0.005)
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/v1/models")).json()["data"][0]["id"] == openai_server.model
        streamed_results = await streams
        plain_results = await asyncio.gather(*(plain(r) for r in requests))
        await client.close()
        return streamed_results, plain_results

    streamed_results, plain_results = asyncio.run(main())
    assert len(streamed_results) == NUM_STREAMS
    for index, (got, expected) in enumerate(zip(streamed_results, plain_results)):
        assert got == expected, index
        assert got[1] in ("stop", "length")
    assert len({text for text, _ in streamed_results}) > 1
