"""The OpenAI-compatible server over raw HTTP: SSE framing byte for byte, every error case,
client disconnects, metrics and the tokenizer endpoints."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from openai_server import MAX_MODEL_LEN, MAX_REQUEST_BYTES

USER = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def http(openai_server) -> httpx.Client:
    with httpx.Client(
        base_url=openai_server.base_url, headers=openai_server.headers, timeout=60
    ) as client:
        yield client


def metric(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    assert error["code"] == code
    return error


# -- streaming ---------------------------------------------------------------------------------


def sse_events(raw: bytes) -> list[bytes]:
    """The payloads of a stream, checking the framing: every event is exactly `data: X\\n\\n`."""
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw
    events = raw.split(b"\n\n")
    assert events.pop() == b""
    payloads = []
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payloads.append(event[len(b"data: "):])
    return payloads


def test_chat_stream_framing_byte_for_byte(http, openai_server):
    body = {"model": openai_server.model, "messages": USER, "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read()
    payloads = sse_events(raw)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    # Compact JSON, one object per event, exactly as serialized.
    expected = b"".join(
        b"data: " + json.dumps(c, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
        for c in chunks
    ) + b"data: [DONE]\n\n"
    assert raw == expected
    request_id = chunks[0]["id"]
    assert request_id.startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["id"] == request_id
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == openai_server.model
        assert set(chunk) == {"id", "object", "created", "model", "choices", "usage"}
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None, "stop_reason": None}]
    content = chunks[1:-1]
    # One chunk per engine step the stream kept up with (up to one per token): the server merges
    # the outputs of steps it had not sent yet, so a fast engine may send fewer.
    assert 1 <= len(content) <= 5
    finish_reasons = [c["choices"][0]["finish_reason"] for c in content]
    assert finish_reasons == [None] * (len(content) - 1) + ["length"]
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_completion_stream_framing(http, openai_server):
    body = {"model": openai_server.model, "prompt": ["a", "b"], "max_tokens": 3, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        payloads = sse_events(response.read())
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    finished = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(choice["index"] for choice in finished) == [0, 1]


def test_force_include_usage_absent_by_default(http, openai_server):
    body = {"model": openai_server.model, "messages": USER, "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(p) for p in sse_events(response.read())[:-1]]
    assert all(c["choices"] for c in chunks)


def test_unknown_fields_ignored_and_null_means_default(http):
    body = {"messages": USER, "max_tokens": 2, "temperature": None, "n": None, "stop": None,
            "stream": None, "tools_choice_of_the_future": {"x": 1}, "user": "someone"}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_message_roles_and_text_parts(http):
    def prompt_tokens(messages: list[dict]) -> int:
        body = {"messages": messages, "max_tokens": 1}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert prompt_tokens([{"role": "user", "content": parts}]) == prompt_tokens(
        [{"role": "user", "content": "first\nsecond"}])
    conversation = [
        {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No lists."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"},
    ]
    assert prompt_tokens(conversation) > 0
    tokens = http.post("/tokenize", json={"messages": conversation}).json()["tokens"]
    rendered = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert rendered.endswith("Be brief.\nNo lists. USER: Hi ASSISTANT: </s>USER: Again ASSISTANT:")


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_larger_than_the_whole_kv_cache_is_refused_up_front(http, stream):
    """40 samples of up to 256 tokens need 680 KV blocks; the cache has 512: a 400 before
    anything runs, for a stream too (no 200 then an error event)."""
    body = {"prompt": "x", "n": 40, "max_tokens": 256, "stream": stream}
    error = assert_error(http.post("/v1/completions", json=body), 400, None,
                         "kv_cache_capacity_exceeded")
    assert "needs 680 KV blocks" in error["message"] and "has 512" in error["message"]
    # The limit in the user's terms: 12 blocks of 16 tokens per sample, prompt of 2 tokens.
    assert "prompt + max_tokens x n can be at most 7602 tokens" in error["message"]
    body = {"messages": USER, "n": 40, "max_completion_tokens": 256, "stream": stream}
    assert_error(http.post("/v1/chat/completions", json=body), 400, None,
                 "kv_cache_capacity_exceeded")


def test_a_request_outgrowing_the_kv_cache_fails_alone_mid_stream(http):
    """Without max_tokens, 40 samples fit at first but grow to up to 32 blocks each, 1280 in
    all; the cache has 512: the engine fails the request mid-stream (an error event, then
    [DONE]) while another request completes."""
    doomed = {"messages": USER, "n": 40, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=doomed) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line)
        assert next(events).startswith("data: {")
        other = http.post("/v1/completions", json={"prompt": "y", "max_tokens": 3})
        assert other.status_code == 200
        rest = list(events)
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "kv_cache_capacity_exceeded" and "KV blocks" in error["message"]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "param"), [
    ("temperature", -1, "temperature"),
    ("top_p", 2, "top_p"),
    ("n", 0, "n"),
    ("max_tokens", 0, "max_tokens"),
    ("max_completion_tokens", 0, "max_completion_tokens"),
    ("presence_penalty", 3, "presence_penalty"),
    ("logit_bias", {"x": 1}, "logit_bias"),
    ("logit_bias", {"5": 500}, "logit_bias"),
    ("top_logprobs", 3, "top_logprobs"),  # without logprobs: true
    ("response_format", {"type": "xml"}, "response_format"),
    ("stop_token_ids", [10**9], "stop_token_ids"),
    ("logit_bias", {str(10**9): 1}, "logit_bias"),  # outside the vocabulary: the engine's check
    ("n", 300, "n"),  # more samples than a step runs (max_num_seqs): the engine's check
    ("temperature", "hot", "temperature"),
    ("messages", [{"role": "robot", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ("messages", [], "messages"),
    ("best_of", 3, "best_of"),  # with stream: true
])
def test_invalid_chat_parameter_is_400_naming_it(http, field, value, param):
    body = {"messages": USER, "stream": field == "best_of", field: value}
    error = assert_error(http.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 10**9]]}, "prompt"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # the prompt alone needs echo
    ({"prompt": "x", "prompt_logprobs": 99}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": "x", "n": 2, "best_of": 300}, "best_of"),
])
def test_invalid_completion_parameter_is_400_naming_it(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param)


def test_malformed_bodies_are_400(http):
    assert_error(http.post("/v1/chat/completions", content=b"{not json"), 400)
    assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)


def test_prompt_over_context_length(http, openai_server):
    long_text = "word " * MAX_MODEL_LEN
    response = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": long_text}], "stream": True})
    assert_error(response, 400, "messages", "context_length_exceeded")
    response = http.post("/v1/completions", json={"prompt": ["short", long_text]})
    assert_error(response, 400, "prompt", "context_length_exceeded")


def test_api_key_required(openai_server):
    url = openai_server.base_url
    missing = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER})
    assert_error(missing, 401, code="invalid_api_key")
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, code="invalid_api_key")
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}), 401, code="invalid_api_key")
    # Every endpoint but the liveness probe needs it, unknown paths included.
    for path in ("/version", "/metrics", "/v1/models", "/no-such-path"):
        assert_error(httpx.get(f"{url}{path}"), 401, code="invalid_api_key")
        assert httpx.get(f"{url}{path}", headers=openai_server.headers).status_code != 401
    assert httpx.get(f"{url}/health").status_code == 200


def test_unknown_model_is_404(http):
    for path, body in (("/v1/chat/completions", {"messages": USER}),
                       ("/v1/completions", {"prompt": "x"})):
        response = http.post(path, json={**body, "model": "gpt-4"})
        assert_error(response, 404, "model", "model_not_found")
    assert_error(http.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_oversized_body_is_413(http):
    big = {"prompt": "x" * MAX_REQUEST_BYTES}
    assert_error(http.post("/v1/completions", json=big), 413, code="request_too_large")

    def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(MAX_REQUEST_BYTES // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunked()), 413, code="request_too_large")


def test_unknown_route_and_method_use_the_envelope(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


# -- disconnects and metrics -------------------------------------------------------------------


def wait_for_idle_engine(http: httpx.Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(http, "pagoda_kv_blocks_used") or metric(http, "pagoda_num_requests_running"):
        assert time.monotonic() < deadline, "the aborted request still holds KV blocks"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_kv_blocks(http, openai_server):
    aborted = metric(http, 'pagoda_requests_total{outcome="aborted"}')
    body = {"messages": USER, "max_tokens": MAX_MODEL_LEN, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = (line for line in response.iter_lines() if line)
        for _ in range(3):
            assert next(events).startswith("data: {")
        assert metric(http, "pagoda_kv_blocks_used") > 0
    # Leaving the block closed the connection mid-stream.
    wait_for_idle_engine(http)
    assert metric(http, "pagoda_num_requests_waiting") == 0
    assert metric(http, 'pagoda_requests_total{outcome="aborted"}') == aborted + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer(http, openai_server):
    aborted = metric(http, 'pagoda_requests_total{outcome="aborted"}')
    body = {"prompt": "x", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "n": 8}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.3)
    wait_for_idle_engine(http)
    assert metric(http, 'pagoda_requests_total{outcome="aborted"}') == aborted + 1


def test_metrics_count_requests_and_tokens(http, openai_server):
    before = {name: metric(http, name) for name in (
        'pagoda_requests_total{outcome="success"}', "pagoda_prompt_tokens_total",
        "pagoda_generation_tokens_total", "pagoda_time_to_first_token_seconds_count",
        "pagoda_e2e_request_latency_seconds_count",
    )}
    response = http.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 4,
                                                  "ignore_eos": True}).json()
    assert response["usage"]["completion_tokens"] == 4
    after = {name: metric(http, name) for name in before}
    assert after['pagoda_requests_total{outcome="success"}'] == before[
        'pagoda_requests_total{outcome="success"}'] + 1
    assert after["pagoda_prompt_tokens_total"] == before["pagoda_prompt_tokens_total"] + 3
    assert after["pagoda_generation_tokens_total"] == before["pagoda_generation_tokens_total"] + 4
    assert after["pagoda_time_to_first_token_seconds_count"] == before[
        "pagoda_time_to_first_token_seconds_count"] + 1
    assert metric(http, "pagoda_kv_blocks_total") == 512
    for name in ("pagoda_time_per_output_token_seconds_count", "pagoda_prefix_cache_hit_rate",
                 "pagoda_num_preemptions_total", "pagoda_num_requests_waiting"):
        assert metric(http, name) >= 0
    rejected = metric(http, 'pagoda_requests_total{outcome="rejected"}')
    http.post("/v1/completions", json={"prompt": "x", "n": 0})
    assert metric(http, 'pagoda_requests_total{outcome="rejected"}') == rejected + 1


# -- the other endpoints -----------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = tokens.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert "".join(body["token_strs"]).endswith(" Hello world")
    text = http.post("/detokenize", json={"tokens": body["tokens"][1:]}).json()["prompt"]
    assert text == "Hello world"
    assert_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    chat = http.post("/tokenize", json={"messages": USER}).json()
    usage = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).json()
    assert chat["count"] == usage["usage"]["prompt_tokens"]


def test_health_version_and_models(http, openai_server):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == openai_server.model
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN
