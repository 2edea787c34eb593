"""The endpoints routers ask of a replica (/server_info, /model_info, /get_load, POST
/flush_cache), over raw HTTP against the real server: their fields, the API key, a flush while
a request streams. tests/test_router.py puts the real router in front of two replicas."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from openai_server import MAX_MODEL_LEN
from test_openai_http import assert_error, metric

# Long enough for several full KV blocks (16 tokens each) of the demo tokenizer.
SHARED_PREFIX = "You are a careful assistant for the accounts team. " * 12


@pytest.fixture(scope="module")
def http(openai_server) -> httpx.Client:
    with httpx.Client(
        base_url=openai_server.base_url, headers=openai_server.headers, timeout=60
    ) as client:
        yield client


def test_server_info_names_the_served_model_and_the_engine_limits(http, openai_server):
    info = http.get("/server_info").json()
    assert http.get("/get_server_info").json() == info
    engine = openai_server.engine.engine
    assert info["served_model_name"] == openai_server.model
    assert info["served_model_names"] == [openai_server.model]
    assert info["model_path"] == str(engine.model_path)
    assert (info["tensor_parallel_size"], info["data_parallel_size"]) == (1, 1)
    assert (info["tp_size"], info["dp_size"]) == (1, 1)
    assert info["max_model_len"] == info["context_length"] == MAX_MODEL_LEN
    assert info["max_num_seqs"] == info["max_running_requests"] == engine.config.max_num_seqs
    assert info["num_kv_blocks"] == 512 and info["block_size"] == 16
    assert info["max_total_num_tokens"] == 512 * 16
    assert info["enable_prefix_caching"] is True
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    assert info["version"] == http.get("/version").json()["version"]


def test_model_info_says_what_the_checkpoint_is(http, openai_server):
    info = http.get("/model_info").json()
    assert http.get("/get_model_info").json() == info
    assert info["is_generation"] is True
    assert (info["model_type"], info["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert info["served_model_name"] == openai_server.model
    assert info["max_context_length"] == MAX_MODEL_LEN
    assert info["vocab_size"] == openai_server.engine.engine.hf_config.vocab_size


def stream_first_chunk_then_rest(http: httpx.Client, body: dict, started: threading.Event,
                                 result: dict) -> None:
    """Stream a completion in a thread: set `started` at its first chunk, keep the rest."""
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()
        result["first"] = next(line for line in lines if line.startswith("data: "))
        started.set()
        result["rest"] = [line for line in lines if line.startswith("data: ")]


def test_load_and_flush_while_a_request_streams(http, openai_server):
    idle = http.get("/get_load").json()
    assert [entry["dp_rank"] for entry in idle] == [0]
    assert idle[0]["num_reqs"] == idle[0]["num_tokens"] == 0
    assert idle[0]["num_kv_blocks_total"] == 512

    body = {"model": openai_server.model, "prompt": SHARED_PREFIX + "First question?",
            "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    started, result = threading.Event(), {}
    streaming = threading.Thread(target=stream_first_chunk_then_rest,
                                 args=(http, body, started, result))
    streaming.start()
    try:
        assert started.wait(60)
        (load,) = http.get("/get_load").json()
        assert (load["num_reqs"], load["num_running_reqs"], load["num_waiting_reqs"]) == (1, 1, 0)
        assert load["num_tokens"] == load["num_kv_blocks_used"] * 16 > 0
        assert 0 < load["kv_cache_usage"] < 1
        # The running request holds its cached prompt blocks: they stay; it goes on unharmed.
        flushed = http.post("/flush_cache")
        assert flushed.status_code == 200, flushed.text
        assert flushed.json()["flushed"] is True
        assert flushed.json()["num_kept_blocks"] > 0
    finally:
        streaming.join(60)
    assert result["rest"][-1] == "data: [DONE]"
    usage = json.loads(result["rest"][-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 200  # all of them, across the flush
    assert http.post("/flush_cache").json()["num_kept_blocks"] == 0


def test_a_flush_empties_the_prefix_cache(http, openai_server):
    body = {"model": openai_server.model, "max_tokens": 2, "temperature": 0}
    hits = "pagoda_prefix_cache_hits_total"
    http.post("/v1/completions", json={**body, "prompt": SHARED_PREFIX + "One?"})
    before = metric(http, hits)
    http.post("/v1/completions", json={**body, "prompt": SHARED_PREFIX + "Two?"})
    assert metric(http, hits) > before  # the shared prefix was found in the cache
    dropped = http.post("/flush_cache").json()["num_dropped_blocks"]
    assert dropped > 0
    assert metric(http, "pagoda_prefix_cache_blocks") == 0
    before = metric(http, hits)
    http.post("/v1/completions", json={**body, "prompt": SHARED_PREFIX + "Three?"})
    assert metric(http, hits) == before  # nothing left to find


def test_router_endpoints_need_the_api_key_and_refuse_other_methods(http, openai_server):
    url = openai_server.base_url
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info",
                 "/get_load"):
        assert_error(httpx.get(f"{url}{path}"), 401, code="invalid_api_key")
    assert_error(httpx.post(f"{url}/flush_cache"), 401, code="invalid_api_key")
    # A flush has effects: it is a POST only, and a GET is a 405 in OpenAI's envelope.
    assert_error(http.get("/flush_cache"), 405)
    assert_error(http.post("/get_load"), 405)
