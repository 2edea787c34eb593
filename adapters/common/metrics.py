"""Prometheus metrics of a server (the OpenAI API, the FastChat worker), all named `pagoda_*`.

Per-request numbers (outcomes, tokens, latencies) are recorded by the request handlers, timed
from the moment the server received the request; engine state (queue lengths, KV blocks, prefix
cache, preemptions) is read from the engine's snapshot when /metrics is scraped, so it is never
stale and costs nothing between scrapes. Each app has its own registry, so two servers (or a
test's server) in one process do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagoda.backend.engine_client import EngineClient
from pagoda.backend.outputs import RequestOutput

Outcome = Literal["success", "rejected", "aborted", "error"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, client: EngineClient) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        snapshot = self._client.snapshot
        gauges = {
            "pagoda_num_requests_running": ("requests in the running batch", snapshot.num_running),
            "pagoda_num_requests_waiting": ("requests queued in the engine", snapshot.num_waiting),
            "pagoda_kv_blocks_used": ("KV cache blocks in use", snapshot.num_kv_blocks_used),
            "pagoda_kv_blocks_total": ("KV cache blocks in the pool", snapshot.num_kv_blocks_total),
            "pagoda_prefix_cache_blocks": (
                "KV blocks the prefix cache can find, free or in use", snapshot.num_cached_blocks,
            ),
            "pagoda_prefix_cache_hit_rate": (
                "fraction of prefix-cache lookups that hit, since start",
                snapshot.prefix_cache_hits / max(snapshot.prefix_cache_queries, 1),
            ),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value)
        counters = {
            "pagoda_num_preemptions": ("requests preempted for KV space", snapshot.num_preemptions),
            "pagoda_prefix_cache_queries": ("prefix-cache lookups", snapshot.prefix_cache_queries),
            "pagoda_prefix_cache_hits": ("prefix-cache hits", snapshot.prefix_cache_hits),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(name, documentation, value=value)


class ServerMetrics:
    def __init__(self, client: EngineClient) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pagoda_requests", "generation requests by outcome", ["outcome"],
            registry=self.registry,
        )
        for outcome in get_args(Outcome):  # every series exists (at 0) from the start
            self.requests.labels(outcome)
        self.prompt_tokens = Counter(
            "pagoda_prompt_tokens", "prompt tokens of finished requests", registry=self.registry
        )
        self.generation_tokens = Counter(
            "pagoda_generation_tokens", "tokens generated", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "pagoda_time_to_first_token_seconds", "request received -> first token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "pagoda_time_per_output_token_seconds", "mean gap between a request's tokens",
            buckets=_PER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "pagoda_e2e_request_latency_seconds", "request received -> last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineCollector(client))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Times one API request (all its prompts and choices) and records it once, when it ends."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._started = time.monotonic()
        self._first_token: float | None = None
        self._num_prompt_tokens: dict[int, int] = {}
        self._num_output_tokens: dict[tuple[int, int], int] = {}
        self._recorded = False

    def observe(self, prompt_index: int, output: RequestOutput) -> None:
        self._num_prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        for completion in output.outputs:
            key = prompt_index, completion.index
            already = self._num_output_tokens.get(key, 0) if output.delta else 0
            self._num_output_tokens[key] = already + len(completion.token_ids)
        if self._first_token is None and any(c.token_ids for c in output.outputs):
            self._first_token = time.monotonic()

    def finish(self, outcome: Outcome) -> None:
        if self._recorded:
            return
        self._recorded = True
        metrics = self._metrics
        metrics.requests.labels(outcome).inc()
        if outcome == "rejected":
            return
        now = time.monotonic()
        metrics.prompt_tokens.inc(sum(self._num_prompt_tokens.values()))
        metrics.generation_tokens.inc(sum(self._num_output_tokens.values()))
        if self._first_token is None or outcome != "success":
            return
        metrics.time_to_first_token.observe(self._first_token - self._started)
        metrics.e2e_latency.observe(now - self._started)
        longest = max(self._num_output_tokens.values())
        if longest > 1:
            metrics.time_per_output_token.observe((now - self._first_token) / (longest - 1))
