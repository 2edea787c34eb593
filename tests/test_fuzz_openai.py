"""Bad input, generated: hypothesis mutates the request bodies of every POST endpoint (wrong
types, huge and negative numbers, NaN and infinities, empty and lone-surrogate strings, unknown
models) and raw bodies are thrown at them (malformed JSON, invalid UTF-8, deep nesting, oversized).

Every answer must be 2xx, or 4xx in OpenAI's error envelope; never a 5xx, never a server error
inside a stream. The session server's teardown then checks that nothing leaked. A longer run:
`python -m pytest -m slow tests/test_fuzz_openai.py`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openai_server import MAX_REQUEST_BYTES, wait_until_idle

# Streams are read this far and then dropped: enough to see an error event, and a request
# that would generate for long (a huge max_tokens) is aborted instead of waited for.
EVENTS_READ = 3

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 20, 21, 256, 257, 2**31, 2**63, 10**12]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "\U0001f600" * 50, "pagoda-test", "gpt-4"]),
    st.lists(st.integers(min_value=-5, max_value=70_000), max_size=6),
    st.lists(st.text(max_size=6), max_size=4),
    st.lists(st.lists(st.integers(min_value=-1, max_value=40_000), max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.floats(), st.text(max_size=4)),
                    max_size=3),
)
SAMPLING_FIELDS = [
    "model", "max_tokens", "temperature", "top_p", "n", "best_of", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p",
    "repetition_penalty", "use_beam_search", "length_penalty", "early_stopping",
    "stop_token_ids", "min_tokens", "stream", "stream_options", "response_format", "user",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
]
ENDPOINTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "/v1/completions": (
        {"prompt": "Hello", "max_tokens": 4, "stream": True},
        [*SAMPLING_FIELDS, "prompt", "logprobs", "echo"],
    ),
    "/v1/chat/completions": (
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
        [*SAMPLING_FIELDS, "messages", "logprobs", "top_logprobs", "max_completion_tokens",
         "add_generation_prompt", "chat_template_kwargs"],
    ),
    "/tokenize": ({"prompt": "Hello"}, ["prompt", "messages", "model", "add_special_tokens",
                                        "return_token_strs", "add_generation_prompt"]),
    "/detokenize": ({"tokens": [1, 2, 3]}, ["tokens", "model"]),
}
MESSAGE = st.fixed_dictionaries({"role": NASTY | st.sampled_from(["user", "system", "tool"]),
                                 "content": NASTY})


@st.composite
def mutated_request(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    base, fields = ENDPOINTS[path]
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
        if name == "messages":
            body[name] = draw(st.lists(MESSAGE, max_size=3) | NASTY)
        else:
            body[name] = draw(NASTY)
    if draw(st.booleans()):
        del body[draw(st.sampled_from(sorted(body)))]  # a required field may go missing
    return path, body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def check_envelope(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error", error
        assert set(error) == {"message", "type", "param", "code"}


def send(client: httpx.Client, path: str, content: bytes) -> None:
    headers = {"content-type": "application/json"}
    with client.stream("POST", path, content=content, headers=headers) as response:
        if response.status_code != 200 or "text/event-stream" not in response.headers.get(
                "content-type", ""):
            response.read()
            check_envelope(response)
            return
        num_events = 0
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            num_events += 1
            if num_events >= EVENTS_READ:
                return  # hang up: the server aborts the rest


def encode(body: Any) -> bytes:
    # allow_nan: NaN and Infinity are what a careless client sends; the server must refuse them.
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def client(openai_server):
    with httpx.Client(base_url=openai_server.base_url, headers=openai_server.headers,
                      timeout=60) as http:
        yield http
    wait_until_idle(openai_server.engine)
    openai_server.engine.engine.check_no_leaks()
    assert httpx.get(f"{openai_server.base_url}/health").status_code == 200


FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUZZ_LONG = settings(FUZZ, max_examples=2000, derandomize=False)


def fuzz_mutated(client: httpx.Client, request: tuple[str, Any]) -> None:
    path, body = request
    send(client, path, encode(body))


def fuzz_any_json(client: httpx.Client, path: str, body: Any) -> None:
    send(client, path, encode(body))


@FUZZ
@given(request=mutated_request())
def test_mutated_requests(client, request):
    fuzz_mutated(client, request)


@FUZZ
@given(path=st.sampled_from(sorted(ENDPOINTS)), body=JSON_VALUES)
def test_arbitrary_json_bodies(client, path, body):
    fuzz_any_json(client, path, body)


@pytest.mark.slow
@FUZZ_LONG
@given(request=mutated_request())
def test_mutated_requests_long(client, request):
    fuzz_mutated(client, request)


@pytest.mark.slow
@FUZZ_LONG
@given(path=st.sampled_from(sorted(ENDPOINTS)), body=JSON_VALUES)
def test_arbitrary_json_bodies_long(client, path, body):
    fuzz_any_json(client, path, body)


RAW_BODIES = {
    "empty": b"",
    "truncated": b'{"prompt": "x", ',
    "not json": b"prompt=hello",
    "invalid utf-8": b'{"prompt": "\xff\xfe"}',
    "utf-16": '{"prompt": "x"}'.encode("utf-16"),
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "array": b"[1, 2, 3]",
    "NaN literal": b'{"prompt": "x", "temperature": NaN}',
    "duplicate keys": b'{"prompt": "x", "prompt": 5}',
    "oversized": b'{"prompt": "' + b"x" * MAX_REQUEST_BYTES + b'"}',
}


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
@pytest.mark.parametrize("name", sorted(RAW_BODIES))
def test_raw_bodies(client, path, name):
    send(client, path, RAW_BODIES[name])


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/completions"), ("POST", "/v1/models"), ("GET", "/v1/nothing-here"),
    ("GET", "/v1/models/" + "x" * 5000), ("DELETE", "/v1/chat/completions"),
])
def test_wrong_routes_and_methods(client, method, path):
    check_envelope(client.request(method, path))


def test_huge_and_unknown_values_name_the_field(client):
    cases = {
        # (A huge max_tokens is not an error: generation stops when the context is full.)
        "n": 10**9, "best_of": 10**9, "max_tokens": -1, "logprobs": 10**6,
        "temperature": float("nan"), "top_p": float("inf"), "top_k": -5,
        "model": "no-such-model",
    }
    for name, value in cases.items():
        response = client.post("/v1/completions", content=encode({"prompt": "x", name: value}),
                               headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (name, response.text)
        check_envelope(response)
        error = response.json()["error"]
        assert error["param"] == name or name in error["message"], (name, error)
