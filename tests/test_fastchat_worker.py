"""The FastChat worker protocol, spoken by a real `pagoda worker` process (not registered).

One worker serves the whole module, with one concurrency slot and room for one waiting request,
so that slot handling and overload show.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from fastchat_processes import (
    free_port,
    post,
    start_pagoda_worker,
    stream_chunks,
    wait_for,
    wait_for_worker,
)

MAX_MODEL_LEN = 2048
NAMES = ["vicuna-demo", "pagoda-demo"]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def worker(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = start_pagoda_worker(
        tmp_path_factory.mktemp("fastchat-worker"), demo_model_dir, port, "--no-register",
        "--model-names", ",".join(NAMES), "--limit-worker-concurrency", "1",
        "--max-waiting-requests", "1",
        "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_worker(url, process)
        yield url
        assert_idle(url)
    finally:
        exit_code = process.stop(signal.SIGINT)
    assert exit_code == 0, process.log_tail()  # Ctrl-C is a clean stop


def assert_idle(url: str) -> None:
    """No request running or queued and no KV block in use, within a few engine steps."""
    wait_for(
        lambda: True if is_idle(post(f"{url}/worker_get_status")) else None, 10.0,
        "worker idle again",
    )


def is_idle(status: dict) -> bool:
    engine = status["engine"]
    busy = (status["queue_length"], engine["num_running"], engine["num_kv_blocks_used"])
    return busy == (0, 0, 0)


def generate(url: str, **body) -> dict:
    return post(f"{url}/worker_generate", body)


def test_stream_is_nul_delimited_cumulative_json(worker):
    chunks = stream_chunks(f"{worker}/worker_generate_stream",
                           {"prompt": "Hello there", "max_new_tokens": 12, **GREEDY})
    assert len(chunks) >= 3
    texts = [chunk["text"] for chunk in chunks]
    # echo defaults to true in FastChat: the text starts with the prompt.
    assert texts[0].startswith("Hello there")
    assert all(after.startswith(before) for before, after in itertools.pairwise(texts))
    for chunk in chunks:
        assert chunk["error_code"] == 0
        usage = chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    # Like FastChat's workers: the final text once more, now with its finish_reason.
    assert chunks[-2]["text"] == chunks[-1]["text"]
    completion_tokens = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion_tokens == sorted(completion_tokens)
    assert chunks[-1]["usage"]["completion_tokens"] <= 12


def test_worker_generate_returns_the_last_chunk(worker):
    body = {"prompt": "Once upon a time", "max_new_tokens": 10, "echo": False, **GREEDY}
    chunks = stream_chunks(f"{worker}/worker_generate_stream", body)
    result = generate(worker, **body)
    assert result == chunks[-1]
    assert not result["text"].startswith("Once upon a time")
    assert result["usage"]["completion_tokens"] == 10
    assert result["finish_reason"] == "length"


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_string_ends_the_text_before_it(worker, as_list):
    full = generate(worker, prompt="Hello", max_new_tokens=24, echo=False, **GREEDY)["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full.find(stop)
    assert cut > 0, full
    result = generate(worker, prompt="Hello", max_new_tokens=24, echo=False,
                      stop=[stop] if as_list else stop, **GREEDY)
    assert result["text"] == full[:cut]
    assert result["finish_reason"] == "stop"


def test_logprobs_cover_the_text(worker):
    result = generate(worker, prompt="Hello", max_new_tokens=8, echo=False, logprobs=2, **GREEDY)
    logprobs = result["logprobs"]
    tokens = logprobs["tokens"]
    assert len(tokens) == result["usage"]["completion_tokens"]
    assert "".join(tokens) == result["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert chosen <= 0.0
        assert 2 <= len(top) <= 3  # the top 2, and the chosen token when it is not among them
        assert chosen == pytest.approx(max(top.values()))  # greedy chose the most likely


def test_echoed_logprobs_start_with_the_prompt_tokens(worker):
    result = generate(worker, prompt="Hello there", max_new_tokens=4, logprobs=0, **GREEDY)
    logprobs = result["logprobs"]
    num_prompt = result["usage"]["prompt_tokens"]
    assert logprobs["token_logprobs"][:num_prompt] == [None] * num_prompt
    assert all(value is not None for value in logprobs["token_logprobs"][num_prompt:])
    generated = "".join(logprobs["tokens"][num_prompt:])
    assert result["text"] == "Hello there" + generated
    assert logprobs["text_offset"][num_prompt] == len("Hello there")


def test_fastchat_style_fields_are_accepted(worker):
    # What FastChat's peers send: None for unset values, a float top_k, an empty stop string,
    # fields a text worker has no use for.
    result = generate(worker, prompt="Hello", model="pagoda-demo", max_new_tokens=4,
                      temperature=0.7, top_p=None, top_k=-1.0, presence_penalty=None,
                      frequency_penalty=0.0, repetition_penalty=1.1, stop="",
                      stop_token_ids=None, echo=False, images=[], request_id="abc",
                      logprobs=None, best_of=None, use_beam_search=None)
    assert result["error_code"] == 0
    assert result["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize("extra", [{"best_of": 3, "temperature": 1.0},
                                   {"best_of": 2, "use_beam_search": True}])
def test_best_of_and_beam_search_send_only_the_final_text(worker, extra):
    chunks = stream_chunks(f"{worker}/worker_generate_stream",
                           {"prompt": "Hello", "max_new_tokens": 6, "echo": False, **extra})
    assert [chunk["finish_reason"] for chunk in chunks][-1] in ("stop", "length")
    assert len(chunks) <= 2
    assert len({chunk["text"] for chunk in chunks}) == 1


@pytest.mark.parametrize(("body", "code"), [
    ({"prompt": "Hi", "model": "someone-else"}, 40301),
    ({"prompt": "Hi", "temperature": -1}, 40302),
    ({"prompt": "Hi", "top_p": 1.5}, 40302),
    ({"prompt": "Hi", "max_new_tokens": 0}, 40302),
    ({"prompt": "Hi", "logprobs": -1}, 40302),
    ({"prompt": "Hi", "stop_token_ids": [10**9]}, 40302),
    ({"prompt": "word " * (MAX_MODEL_LEN + 10)}, 40303),
    # 8 samples of up to 1000 tokens need 504 KV blocks; the worker has 256.
    ({"prompt": "Hi", "best_of": 8, "temperature": 1.0, "max_new_tokens": 1000}, 40302),
    ({"prompt": "Hi", "temperature": "hot"}, 40001),
    ({"max_new_tokens": 4}, 40001),
    ("not an object", 40001),
])
def test_errors_carry_fastchat_error_codes(worker, body, code):
    chunks = stream_chunks(f"{worker}/worker_generate_stream", body)
    assert len(chunks) == 1
    assert chunks[0]["error_code"] == code, chunks[0]
    assert chunks[0]["text"]
    result = post(f"{worker}/worker_generate", body)
    assert result["error_code"] == code


def test_a_body_that_is_not_json_is_a_validation_error(worker):
    response = httpx.post(f"{worker}/worker_generate", content=b"{oops", timeout=10)
    assert response.status_code == 200
    assert response.json()["error_code"] == 40001


def test_status_tokens_details_and_template(worker, demo_model_dir):
    status = post(f"{worker}/worker_get_status")
    assert status["model_names"] == NAMES
    assert status["speed"] == 1
    assert status["queue_length"] == 0
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    count = post(f"{worker}/count_token", {"prompt": "Hello world, again"})
    assert count == {"count": len(tokenizer("Hello world, again").input_ids), "error_code": 0}
    assert post(f"{worker}/model_details", {"model": "vicuna-demo"}) == {
        "context_length": MAX_MODEL_LEN
    }
    conv = post(f"{worker}/worker_get_conv_template", {"model": "vicuna-demo"})["conv"]
    assert (conv["name"], conv["sep_style"], conv["sep"], conv["sep2"]) == (
        "vicuna_v1.1", 2, " ", "</s>"
    )
    assert conv["roles"] == ["USER", "ASSISTANT"]


def test_worker_get_embeddings_in_fastchats_shape(worker, demo_model_dir):
    texts = ["hi", "Hello there, how are you?"]
    result = post(f"{worker}/worker_get_embeddings", {"model": "vicuna-demo", "input": texts})
    assert set(result) == {"embedding", "token_num"}
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    assert result["token_num"] == sum(len(tokenizer.encode(text)) for text in texts)
    vectors = result["embedding"]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 1
    assert sum(value * value for value in vectors[0]) == pytest.approx(1.0, abs=1e-5)
    encoded = post(f"{worker}/worker_get_embeddings",
                   {"model": "vicuna-demo", "input": texts, "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(encoded["embedding"][1]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(vectors[1], abs=1e-6)


@pytest.mark.parametrize(("body", "code"), [
    ({"model": "someone-else", "input": ["hi"]}, 40301),
    ({"model": "vicuna-demo", "input": [1, 2]}, 40001),
    ({"model": "vicuna-demo", "input": ["word " * (MAX_MODEL_LEN + 10)]}, 40303),
])
def test_embedding_errors_carry_fastchat_error_codes(worker, body, code):
    assert post(f"{worker}/worker_get_embeddings", body)["error_code"] == code


def test_disconnect_mid_stream_aborts_and_frees_the_slot(worker):
    body = {"prompt": "Hello", "max_new_tokens": 1000, **GREEDY}
    url = f"{worker}/worker_generate_stream"
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        # NOTE: the iterator is kept: an abandoned iter_raw() closes the response at once.
        raw = response.iter_raw()
        received = b""
        while received.count(b"\0") < 2:
            received += next(raw)
        status = post(f"{worker}/worker_get_status")
        assert status["queue_length"] == 1
        assert status["engine"]["num_kv_blocks_used"] > 0
        # The one slot is taken: a second request waits for it and counts in the queue.
        waiting: dict = {}
        second = threading.Thread(target=lambda: waiting.update(
            generate(worker, prompt="Hi", max_new_tokens=2, **GREEDY)))
        second.start()
        wait_for(lambda: True if post(f"{worker}/worker_get_status")["queue_length"] == 2 else None,
                 10.0, "second request queued behind the first")
        # With one request waiting (--max-waiting-requests 1) a third one is refused at once.
        refused = generate(worker, prompt="Hi", max_new_tokens=2)
        assert refused["error_code"] == 42903, refused
    # Leaving the block closed the connection mid-stream.
    second.join(timeout=30)
    assert waiting.get("error_code") == 0, waiting
    assert_idle(worker)


def test_disconnect_during_worker_generate_aborts(worker):
    body = json.dumps({"prompt": "Hello", "max_new_tokens": 1000, **GREEDY})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{worker}/worker_generate", content=body, timeout=1.5)
    assert_idle(worker)


def metric(url: str, name: str) -> float:
    """A sample's value from the worker's Prometheus text (`name` with its labels, if any)."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for line in response.text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_and_metrics_for_load_balancers_and_scrapers(worker):
    assert httpx.get(f"{worker}/health", timeout=10).status_code == 200
    success = 'pagoda_requests_total{outcome="success"}'
    rejected = 'pagoda_requests_total{outcome="rejected"}'
    before = {name: metric(worker, name) for name in
              (success, rejected, "pagoda_generation_tokens_total",
               "pagoda_time_to_first_token_seconds_count")}
    answer = generate(worker, prompt="Hello", max_new_tokens=5, **GREEDY)
    assert answer["error_code"] == 0
    assert generate(worker, model="someone-else", prompt="Hi")["error_code"] == 40301
    assert metric(worker, success) == before[success] + 1
    assert metric(worker, rejected) == before[rejected] + 1
    assert metric(worker, "pagoda_generation_tokens_total") == (
        before["pagoda_generation_tokens_total"] + answer["usage"]["completion_tokens"])
    assert metric(worker, "pagoda_time_to_first_token_seconds_count") == (
        before["pagoda_time_to_first_token_seconds_count"] + 1)
    # The engine's own gauges, read when scraped.
    assert metric(worker, "pagoda_kv_blocks_total") == 256
    assert metric(worker, "pagoda_num_requests_running") == 0
