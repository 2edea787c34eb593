"""Two `pagoda serve` replicas behind a real router (sglang-router, the SGLang Model Gateway, and
vllm-router, from PyPI: `pip install -e '.[router]'`), all on 127.0.0.1: the model listed through
the router, chat and completions streamed and not, cache-aware affinity (one tenant's requests
all on one replica, its prefix found there), a flush fanned out to both, and a quick run of
benchmarks/routing.py. Slow: two engines and a router start per module (a minute or more on two
busy cores)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS_DIR))
try:
    import processes  # benchmarks/processes.py: the replicas and routers the benchmark starts
finally:
    sys.path.remove(str(BENCHMARKS_DIR))

pytestmark = pytest.mark.slow

MODEL = "pagoda-demo"
NUM_KV_BLOCKS = 128
REPLICA_FLAGS = ("--served-model-name", MODEL, "--num-kv-blocks", str(NUM_KV_BLOCKS),
                 "--max-model-len", "1024", "--cpu-threads", "1")
ROUTERS = {"sglang": "sglang-router", "vllm": "vllm-router"}
# One tenant's system prompt: long enough for many full KV blocks of 16 tokens.
TENANT_PROMPT = ("You are the billing assistant of the Aurora Borealis observatory gift shop. "
                 "Answer politely, cite the order number, never promise refunds. ") * 6


@dataclass
class Deployment:
    router: str  # "sglang" or "vllm"
    router_url: str
    replica_urls: list[str]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.router_url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def replicas(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[str]]:
    workdir = tmp_path_factory.mktemp("router-replicas")
    started = processes.start_replicas(workdir, demo_model_dir, 2, *REPLICA_FLAGS)
    try:
        yield [url for _, url in started]
        for _, url in started:
            assert_idle(url)
    finally:
        for process, _ in started:
            process.stop()
    # SIGTERM drains and exits cleanly.
    assert [process.process.returncode for process, _ in started] == [0, 0]


@pytest.fixture(scope="module", params=sorted(ROUTERS))
def deployment(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    kind = request.param
    if not processes.router_installed(kind):  # before the replicas start: a skip costs nothing
        pytest.skip(f"{ROUTERS[kind]} is not installed (pip install -e '.[router]')")
    replicas = request.getfixturevalue("replicas")
    router, url = processes.start_router(kind, tmp_path_factory.mktemp(f"{kind}-router"),
                                         replicas, "cache_aware")
    try:
        yield Deployment(kind, url, replicas)
    finally:
        router.stop()


def metrics_of(url: str) -> dict[str, float]:
    """A replica's Prometheus samples, by name with labels."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


SUCCESS = 'pagoda_requests_total{outcome="success"}'
HITS = "pagoda_prefix_cache_hits_total"


def assert_idle(url: str) -> None:
    """Nothing running or waiting and no KV block held, once the last step is done."""
    deadline = time.monotonic() + 30
    while True:
        (load,) = httpx.get(f"{url}/get_load", timeout=10).json()
        busy = (load["num_reqs"], load["num_tokens"], load["num_kv_blocks_used"])
        if busy == (0, 0, 0):
            return
        assert time.monotonic() < deadline, f"{url} still busy: {load}"
        time.sleep(0.1)


def test_the_model_is_listed_through_the_router(deployment):
    assert [model.id for model in deployment.client().models.list()] == [MODEL]
    # What compose's healthcheck of the router polls.
    assert httpx.get(f"{deployment.router_url}/health", timeout=10).status_code == 200


def test_chat_and_completions_through_the_router_streamed_and_not(deployment):
    client = deployment.client()
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    # Greedy on identical replicas: the same answer wherever each request went.
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason

    completion = client.completions.create(model=MODEL, prompt="Once upon a time",
                                           max_tokens=8, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
        if chunk.choices)
    assert streamed == completion.choices[0].text
    assert completion.usage.completion_tokens == 8


def test_a_tenants_requests_stay_on_one_replica_and_hit_its_cache(deployment):
    before = {url: metrics_of(url) for url in deployment.replica_urls}
    client = deployment.client()
    for question in ("Where is order 1?", "Can I get a refund?", "Is order 7 late?",
                     "Thanks!"):
        client.chat.completions.create(
            model=MODEL, max_tokens=2, temperature=0,
            messages=[{"role": "system", "content": TENANT_PROMPT},
                      {"role": "user", "content": question}])
    after = {url: metrics_of(url) for url in deployment.replica_urls}
    served = {url: after[url][SUCCESS] - before[url][SUCCESS] for url in after}
    assert sorted(served.values()) == [0, 4], served
    (chosen,) = (url for url, count in served.items() if count == 4)
    # The 3 requests after the first found the tenant's prompt cached: > 10 blocks each.
    assert after[chosen][HITS] - before[chosen][HITS] >= 3 * 10


def test_a_flush_through_the_router_reaches_both_replicas(deployment):
    client = deployment.client()
    for tenant in ("alpha", "beta"):
        client.completions.create(model=MODEL, prompt=f"{tenant}: {TENANT_PROMPT}",
                                  max_tokens=1)
    flushed = httpx.post(f"{deployment.router_url}/flush_cache", timeout=30)
    if flushed.status_code == 404:
        pytest.skip("this router has no /flush_cache")
    assert flushed.status_code == 200, flushed.text
    for url in deployment.replica_urls:
        assert metrics_of(url)["pagoda_prefix_cache_blocks"] == 0


def test_the_routing_benchmark_runs(deployment, demo_model_dir, tmp_path):
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        import routing
    finally:
        sys.path.remove(str(BENCHMARKS_DIR))
    output = tmp_path / "routing.json"
    routing.main(["--model", str(demo_model_dir), "--quick", "--output", str(output),
                  "--replica-urls", *deployment.replica_urls, "--router", deployment.router])
    result = json.loads(output.read_text())
    assert output.with_suffix(".png").exists()
    assert set(result["policies"]) == {"cache_aware", "round_robin"}
    for policy in result["policies"].values():
        assert 0.0 <= policy["prefix_cache_hit_rate"] <= 1.0
        assert policy["completed"] == policy["num_requests"]
        assert re.fullmatch(r"[\d.]+", str(policy["ttft_s"]["p50"]))
