"""Load clients for the reliability tests and integration/soak.py: streaming OpenAI and FastChat
clients that may hang up part-way, a request mix, and a /metrics reader.

A client that disconnects reads `disconnect_after` events (chunks) and then closes its
connection, as a browser tab closed mid-answer does; the server must abort the request and free
its KV blocks.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

# Words for prompts of any length (the demo tokenizer splits them into a few tokens each).
_WORDS = ("paged", "attention", "keeps", "every", "block", "of", "the", "cache", "busy", "while",
          "requests", "come", "and", "go", "in", "bursts")


@dataclass
class Outcome:
    status: int
    # "done" (ended with [DONE] / a final chunk), "disconnected" (the client hung up) or "error".
    kind: str
    texts: dict[int, str] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    detail: str = ""


def prompt_of(num_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(num_words))


def mixed_request(index: int, rng: random.Random, long_words: int = 120) -> dict[str, Any]:
    """Completion request bodies cycling through the shapes a team server sees: short and long
    prompts (long ones need several prefill chunks), n > 1, beam search, greedy."""
    kind = index % 5
    body: dict[str, Any] = {"max_tokens": rng.randint(4, 12), "stream": True, "ignore_eos": True}
    if kind == 0:
        body.update(prompt=prompt_of(rng.randint(2, 10), rng), temperature=0)
    elif kind == 1:
        body.update(prompt=prompt_of(long_words, rng), temperature=0)
    elif kind == 2:
        body.update(prompt=prompt_of(rng.randint(5, 40), rng), n=3, temperature=0.9,
                    seed=index)
    elif kind == 3:
        body.update(prompt=prompt_of(rng.randint(5, 30), rng), n=2, use_beam_search=True,
                    temperature=0)
    else:
        body.update(prompt=prompt_of(rng.randint(20, 80), rng), temperature=0.7, top_p=0.9,
                    stream_options={"include_usage": True})
    return body


def expected_choices(body: dict[str, Any]) -> int:
    return int(body.get("n") or 1)


async def openai_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str],
    disconnect_after: int | None = None,
) -> Outcome:
    """POST a streaming completion (or chat) request and read its SSE events."""
    outcome = Outcome(status=0, kind="error")
    async with client.stream("POST", url, json=body, headers=headers) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.detail = (await response.aread()).decode(errors="replace")
            return outcome
        num_events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                outcome.kind = "done"
                return outcome
            event = json.loads(payload)
            if "error" in event:
                outcome.detail = json.dumps(event["error"])
                return outcome
            for choice in event["choices"]:
                index = choice["index"]
                text = choice.get("text")
                if text is None:
                    text = choice.get("delta", {}).get("content") or ""
                outcome.texts[index] = outcome.texts.get(index, "") + text
                if choice.get("finish_reason"):
                    outcome.finish_reasons[index] = choice["finish_reason"]
            num_events += 1
            if disconnect_after is not None and num_events >= disconnect_after:
                outcome.kind = "disconnected"
                return outcome  # leaving the block closes the connection
    outcome.detail = "stream ended without [DONE]"
    return outcome


async def fastchat_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any],
    disconnect_after: int | None = None,
) -> Outcome:
    """POST to /worker_generate_stream and read its NUL-delimited JSON chunks."""
    outcome = Outcome(status=0, kind="error")
    async with client.stream("POST", url, json=body) as response:
        outcome.status = response.status_code
        buffer = b""
        num_chunks = 0
        async for data in response.aiter_bytes():
            buffer += data
            *chunks, buffer = buffer.split(b"\0")
            for raw in chunks:
                chunk = json.loads(raw)
                if chunk["error_code"] != 0:
                    outcome.detail = chunk["text"]
                    return outcome
                outcome.texts[0] = chunk["text"]
                if chunk.get("finish_reason"):
                    outcome.finish_reasons[0] = chunk["finish_reason"]
                    outcome.kind = "done"
                num_chunks += 1
                if disconnect_after is not None and num_chunks >= disconnect_after:
                    outcome.kind = "disconnected"
                    return outcome
    if outcome.kind != "done":
        outcome.detail = "stream ended without a final chunk"
    return outcome


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (comments skipped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def engine_gauges(client: httpx.AsyncClient, base_url: str,
                        headers: dict[str, str] | None = None) -> dict[str, float]:
    response = await client.get(f"{base_url}/metrics", headers=headers or {})
    response.raise_for_status()
    metrics = parse_metrics(response.text)
    return {
        "running": metrics["pagoda_num_requests_running"],
        "waiting": metrics["pagoda_num_requests_waiting"],
        "kv_blocks_used": metrics["pagoda_kv_blocks_used"],
        "kv_blocks_total": metrics["pagoda_kv_blocks_total"],
        "preemptions": metrics["pagoda_num_preemptions_total"],
    }
