"""Load: 256 concurrent streaming clients on each protocol, a fifth of them hanging up part-way.

One engine serves the OpenAI API and the FastChat worker routes from one app, with a KV pool
small enough that long prompts are prefilled in chunks and requests are preempted. Every client
that stays must get a complete, correct answer (greedy ones equal to the same request sent alone
afterwards), nobody gets a 5xx, and afterwards /metrics shows nothing running or waiting and no
KV block held.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx

from combined_server import API_KEY, FASTCHAT_MODEL, server  # noqa: F401  (fixture)
from load_clients import (
    Outcome,
    engine_gauges,
    expected_choices,
    fastchat_stream,
    mixed_request,
    openai_stream,
    prompt_of,
)

NUM_CLIENTS = 256
DISCONNECT_FRACTION = 0.2
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
GREEDY_MAX_TOKENS = 6


def greedy_pool(rng: random.Random) -> list[str]:
    """A few prompts, short and long, that greedy clients share, so each has a reference."""
    return [prompt_of(n, rng) for n in (3, 8, 20, 120, 150)]


async def settle(base_url: str, engine: Any, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once the engine is idle (aborts land within a step)."""
    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + timeout
        while True:
            gauges = await engine_gauges(client, base_url, HEADERS)
            if not (gauges["running"] or gauges["waiting"] or gauges["kv_blocks_used"]):
                return gauges
            assert time.monotonic() < deadline, f"engine not idle after the load: {gauges}"
            await asyncio.sleep(0.1)


def check_outcomes(outcomes: list[Outcome], hang_ups: list[bool]) -> None:
    statuses = sorted({outcome.status for outcome in outcomes})
    assert statuses == [200], f"statuses {statuses}: {[o.detail for o in outcomes if o.status != 200][:3]}"
    for outcome, hung_up in zip(outcomes, hang_ups):
        if not hung_up:
            assert outcome.kind == "done", outcome.detail


def client_limits() -> httpx.Limits:
    return httpx.Limits(max_connections=NUM_CLIENTS + 8, max_keepalive_connections=NUM_CLIENTS)


def test_openai_load_with_disconnects(server):
    base_url, engine = server
    rng = random.Random(9)
    pool = greedy_pool(rng)
    bodies, hang_ups = [], []
    for index in range(NUM_CLIENTS):
        body = mixed_request(index, rng)
        if body.get("temperature") == 0 and "n" not in body:  # greedy: from the shared pool
            body.update(prompt=pool[index % len(pool)], max_tokens=GREEDY_MAX_TOKENS)
        bodies.append(body)
        hang_ups.append(rng.random() < DISCONNECT_FRACTION)
    url = f"{base_url}/v1/completions"
    preemptions_before = engine.snapshot.num_preemptions

    async def burst() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=120, limits=client_limits()) as client:
            return await asyncio.gather(*(
                openai_stream(client, url, body, HEADERS, rng.randint(1, 3) if hang_up else None)
                for body, hang_up in zip(bodies, hang_ups)
            ))

    outcomes = asyncio.run(burst())
    check_outcomes(outcomes, hang_ups)
    gauges = asyncio.run(settle(base_url, engine))
    assert gauges["preemptions"] > preemptions_before, "the pool was meant to force preemption"
    engine.engine.check_no_leaks()

    references = {}
    for prompt in pool:  # each alone, on the now idle server
        response = httpx.post(url, headers=HEADERS, timeout=60, json={
            "prompt": prompt, "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0,
            "ignore_eos": True})
        references[prompt] = response.json()["choices"][0]["text"]
    for body, outcome, hung_up in zip(bodies, outcomes, hang_ups):
        if hung_up:
            continue
        num_choices = expected_choices(body)
        assert sorted(outcome.finish_reasons) == list(range(num_choices)), body
        assert set(outcome.finish_reasons.values()) <= {"length", "stop"}
        if body["prompt"] in references and "n" not in body:
            assert outcome.texts[0] == references[body["prompt"]]


def test_fastchat_load_with_disconnects(server):
    base_url, engine = server
    rng = random.Random(11)
    pool = greedy_pool(rng)
    bodies, hang_ups = [], []
    for index in range(NUM_CLIENTS):
        body: dict[str, Any] = {"model": FASTCHAT_MODEL, "echo": False}
        kind = index % 4
        if kind == 0:
            body.update(prompt=pool[index % len(pool)], temperature=0,
                        max_new_tokens=GREEDY_MAX_TOKENS)
        elif kind == 1:
            body.update(prompt=prompt_of(rng.randint(60, 150), rng), temperature=0.7,
                        top_p=0.9, max_new_tokens=rng.randint(4, 10))
        elif kind == 2:
            body.update(prompt=prompt_of(rng.randint(5, 30), rng), temperature=0,
                        use_beam_search=True, best_of=2, max_new_tokens=6)
        else:
            body.update(prompt=prompt_of(rng.randint(2, 12), rng), temperature=1.0,
                        max_new_tokens=rng.randint(4, 10))
        bodies.append(body)
        hang_ups.append(rng.random() < DISCONNECT_FRACTION)
    url = f"{base_url}/worker_generate_stream"

    async def burst() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=120, limits=client_limits()) as client:
            return await asyncio.gather(*(
                fastchat_stream(client, url, body, rng.randint(1, 2) if hang_up else None)
                for body, hang_up in zip(bodies, hang_ups)
            ))

    outcomes = asyncio.run(burst())
    check_outcomes(outcomes, hang_ups)
    asyncio.run(settle(base_url, engine))
    engine.engine.check_no_leaks()

    references = {}
    for prompt in pool:
        response = httpx.post(f"{base_url}/worker_generate", timeout=60, json={
            "model": FASTCHAT_MODEL, "echo": False, "prompt": prompt, "temperature": 0,
            "max_new_tokens": GREEDY_MAX_TOKENS})
        references[prompt] = response.json()["text"]
    for body, outcome, hung_up in zip(bodies, outcomes, hang_ups):
        if not hung_up:
            assert outcome.finish_reasons[0] in ("length", "stop")
            if body["prompt"] in references and body["temperature"] == 0 \
                    and not body.get("use_beam_search"):
                assert outcome.texts[0] == references[body["prompt"]]
