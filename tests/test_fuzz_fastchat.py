"""Bad input for the FastChat worker routes: mutated and raw bodies. FastChat's peers read
errors from the body, so every answer must be HTTP 200 with a FastChat `error_code` (0 when the
request was served), never a 5xx; afterwards nothing is left running and no KV block is held."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from combined_server import FASTCHAT_MODEL, server  # noqa: F401  (the module's server fixture)
from openai_server import MAX_REQUEST_BYTES, wait_until_idle
from test_fuzz_openai import JSON_VALUES, NASTY, RAW_BODIES, encode

FIELDS = ["model", "prompt", "temperature", "top_p", "top_k", "max_new_tokens", "stop",
          "stop_token_ids", "echo", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "logprobs", "best_of", "use_beam_search"]
PATHS = ["/worker_generate_stream", "/worker_generate", "/count_token"]
CHUNKS_READ = 3


@st.composite
def mutated_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": FASTCHAT_MODEL, "prompt": "Hello", "max_new_tokens": 4}
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        body[name] = draw(NASTY)
    return body


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    base_url, engine = server
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http
    wait_until_idle(engine)
    engine.engine.check_no_leaks()


def send(client: httpx.Client, path: str, content: bytes) -> None:
    with client.stream("POST", path, content=content) as response:
        assert response.status_code == 200, response.read()[:300]
        num_read = 0
        buffer = b""
        for data in response.iter_bytes():
            buffer += data
            *chunks, buffer = buffer.split(b"\0")
            for raw in chunks:
                check_chunk(json.loads(raw))
                num_read += 1
            if num_read >= CHUNKS_READ:
                return  # hang up: the server aborts the rest
        if buffer.strip():  # /worker_generate and /count_token: one JSON object, no NUL
            check_chunk(json.loads(buffer))


def check_chunk(chunk: dict[str, Any]) -> None:
    code = chunk.get("error_code", 0)
    assert isinstance(code, int) and code < 50000, chunk  # 5xxxx: an internal error


FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(path=st.sampled_from(PATHS), body=mutated_body())
def test_mutated_bodies(client, path, body):
    send(client, path, encode(body))


@FUZZ
@given(path=st.sampled_from(PATHS), body=JSON_VALUES)
def test_arbitrary_json_bodies(client, path, body):
    send(client, path, encode(body))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_raw_bodies(client, path, name):
    send(client, path, RAW_BODIES[name])


@pytest.mark.parametrize("path", PATHS)
def test_a_body_over_the_limit_is_a_validation_error(client, path):
    body = encode({"prompt": "x" * MAX_REQUEST_BYTES})
    for content in (body, iter([body])):  # with a Content-Length, then chunked
        response = client.post(path, content=content)
        assert response.status_code == 200
        chunk = json.loads(response.content.rstrip(b"\0"))
        assert chunk["error_code"] == 40001 and "exceeds the limit" in chunk["text"], chunk
