"""Load generation for the serving benchmarks: streaming clients for the OpenAI API and for
FastChat's worker protocol (through the controller, as FastChat's API server does), Poisson or
closed-loop (fixed concurrency) drivers, and latency summaries.

Every client records, per request: when it was sent, time to first token (TTFT: the first chunk
carrying output), the gaps between later chunks (inter-token latency, ITL), end-to-end latency
and the numbers of prompt and output tokens the server reports (usage; for n > 1, the output
tokens of every choice)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm


@dataclass(slots=True)
class RequestResult:
    sent: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0  # as the server reports it (0 where it does not)
    num_choices: int = 1  # n: output_tokens counts the tokens of every choice
    itls: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        """Time per output token of a choice, after the first; None when each choice arrived in
        one chunk (beam search sends its beams when they finish), which times no token."""
        tokens_per_choice = self.output_tokens / self.num_choices
        if not self.ok or tokens_per_choice < 2 or self.ttft is None or not self.itls:
            return None
        return (self.e2e - self.ttft) / (tokens_per_choice - 1)


SendOne = Callable[[httpx.AsyncClient, int], Awaitable[RequestResult]]


async def _stream_openai(client: httpx.AsyncClient, url: str, body: dict,
                        text_of: Callable[[dict], str | None]) -> RequestResult:
    """POST a streaming request and time its SSE chunks; `text_of(choice)` is the output text a
    chunk's choice carries. TTFT is the first chunk of any choice; inter-token gaps are taken
    within each choice (with n > 1 the choices' chunks interleave)."""
    result = RequestResult(sent=time.perf_counter())
    last_by_choice: dict[int, float] = {}
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices") or []:
                if not text_of(choice):
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - result.sent
                index = choice.get("index", 0)
                if index in last_by_choice:
                    result.itls.append(now - last_by_choice[index])
                last_by_choice[index] = now
    result.e2e = time.perf_counter() - result.sent
    result.num_choices = max(1, len(last_by_choice))
    return result


def _request_body(model: str, output_len: int, extra: dict | None) -> dict:
    """Greedy, exactly `output_len` tokens per choice, streamed with usage; `extra` overrides
    (n, temperature, seed, use_beam_search...)."""
    return {"model": model, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}


def openai_completion_client(base_url: str, model: str, prompts: list[list[int]],
                             output_lens: list[int], extra: dict | None = None) -> SendOne:
    """Streams /v1/completions with token-id prompts."""

    async def send(client: httpx.AsyncClient, index: int) -> RequestResult:
        body = _request_body(model, output_lens[index], extra) | {"prompt": prompts[index]}
        return await _stream_openai(client, f"{base_url}/v1/completions", body,
                                    lambda choice: choice.get("text"))

    return send


def openai_chat_client(base_url: str, model: str, conversations: list[list[dict[str, str]]],
                       output_lens: list[int], extra: dict | None = None) -> SendOne:
    """Streams /v1/chat/completions, one conversation (list of messages) per request."""

    async def send(client: httpx.AsyncClient, index: int) -> RequestResult:
        body = _request_body(model, output_lens[index], extra) | {
            "messages": conversations[index]}
        return await _stream_openai(client, f"{base_url}/v1/chat/completions", body,
                                    lambda choice: (choice.get("delta") or {}).get("content"))

    return send


def fastchat_worker_client(controller_url: str, model: str, prompts: list[str],
                           max_new_tokens: int) -> SendOne:
    """FastChat's API server's path: ask the controller for a worker, then stream
    /worker_generate_stream from it (NUL-separated JSON chunks, cumulative text)."""

    async def send(client: httpx.AsyncClient, index: int) -> RequestResult:
        result = RequestResult(sent=time.perf_counter())
        answer = await client.post(f"{controller_url}/get_worker_address", json={"model": model})
        address = answer.json()["address"]
        if not address:
            result.error = "no worker address"
            return result
        body = {"model": model, "prompt": prompts[index], "temperature": 0.0, "top_p": 1.0,
                "max_new_tokens": max_new_tokens, "echo": False, "stop": None}
        last, seen_text, buffer = result.sent, "", b""
        async with client.stream("POST", f"{address}/worker_generate_stream",
                                 json=body) as response:
            async for raw in response.aiter_bytes():
                buffer += raw
                *parts, buffer = buffer.split(b"\0")
                for part in parts:
                    chunk = json.loads(part)
                    if chunk.get("error_code"):
                        result.error = f"{chunk['error_code']}: {chunk.get('text')}"
                        return result
                    result.output_tokens = (chunk.get("usage") or {}).get(
                        "completion_tokens", result.output_tokens)
                    if len(chunk.get("text", "")) > len(seen_text):
                        now = time.perf_counter()
                        if result.ttft is None:
                            result.ttft = now - result.sent
                        else:
                            result.itls.append(now - last)
                        last, seen_text = now, chunk["text"]
        result.e2e = time.perf_counter() - result.sent
        return result

    return send


async def _guarded(send: SendOne, client: httpx.AsyncClient, index: int) -> RequestResult:
    try:
        return await send(client, index)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
        return RequestResult(sent=time.perf_counter(), error=repr(error))


async def poisson(send: SendOne, num_requests: int, rate: float, seed: int, deadline_s: float,
                  desc: str) -> tuple[list[RequestResult], float]:
    """Send request i at the i-th arrival of a seeded Poisson process of `rate` per second;
    requests still unfinished `deadline_s` after the start are cancelled (the engine aborts
    them) and count as incomplete. Returns the results and the wall time used."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    progress = tqdm(total=num_requests, desc=desc, leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        started = time.perf_counter()

        async def at_arrival(index: int) -> RequestResult:
            await asyncio.sleep(max(0.0, started + arrivals[index] - time.perf_counter()))
            sent = time.perf_counter()
            try:
                result = await _guarded(send, client, index)
            except asyncio.CancelledError:
                result = RequestResult(sent=sent, error="incomplete at the deadline")
                raise
            finally:
                progress.update(1)
            return result

        tasks = [asyncio.ensure_future(at_arrival(i)) for i in range(num_requests)]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - started
    progress.close()
    cutoff = started + deadline_s
    results = []
    for index, task in enumerate(tasks):
        if task in done:
            results.append(task.result())
        else:  # NOTE: its TTFT is at least the time it waited; kept as a lower bound.
            sent = started + float(arrivals[index])
            results.append(RequestResult(sent=sent, error="incomplete at the deadline",
                                         ttft=max(0.0, cutoff - sent) if sent < cutoff else None))
    return results, elapsed


async def closed_loop(send: SendOne, num_requests: int, concurrency: int,
                      desc: str) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, each sending its next request as soon as the last one ends."""
    queue = list(range(num_requests))
    results: list[RequestResult] = []
    progress = tqdm(total=num_requests, desc=desc, leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        started = time.perf_counter()

        async def client_loop() -> None:
            while queue:
                results.append(await _guarded(send, client, queue.pop(0)))
                progress.update(1)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    progress.close()
    return results, elapsed


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def summarize(results: list[RequestResult], elapsed: float) -> dict[str, object]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens]
    errors = sorted({r.error for r in results if r.error})
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": errors[:5],
        "wall_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
        # TTFT over every request, incomplete ones at their lower bound: a queue that never
        # drains must not look fast.
        "ttft_s": percentiles([r.ttft for r in results if r.ttft is not None]),
        "tpot_s": percentiles([t for r in ok if (t := r.tpot) is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }
