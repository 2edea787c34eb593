"""`pagoda serve` as users start it: a subprocess with the server and engine flags, including
the waiting-queue limit (503 with Retry-After), a chat template file and forced usage chunks."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from openai_server import pagoda_serve

API_KEY = "cli-key"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def cli_server(demo_model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    with pagoda_serve(
        "--model", str(demo_model_dir), "--served-model-name", "demo", "alias",
        "--api-key", API_KEY, "--chat-template", str(template),
        "--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "300",
        "--max-model-len", "4096", "--max-num-seqs", "1", "--max-waiting-requests", "1",
        "--enable-force-include-usage", "--uvicorn-log-level", "warning",
    ) as base_url:
        yield base_url


@pytest.fixture
def http(cli_server):
    with httpx.Client(
        base_url=cli_server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as client:
        yield client


def metric(http: httpx.Client, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.MULTILINE).group(1))


def test_served_names_and_flags(http):
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["demo", "alias"]
    assert models[0]["max_model_len"] == 4096
    assert metric(http, "pagoda_kv_blocks_total") == 300
    reply = http.post("/v1/completions", json={"model": "alias", "prompt": "x", "max_tokens": 1})
    assert reply.json()["model"] == "alias"
    assert httpx.get(f"{http.base_url}/v1/models").status_code == 401


def test_chat_template_file_is_used(http):
    messages = [{"role": "user", "content": "Hi"}]
    rendered = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    expected = http.post("/tokenize", json={"prompt": "user: Hi\n"}).json()["tokens"]
    assert rendered == expected


def test_usage_chunk_always_sent(http):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line for line in response.iter_lines() if line]
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2


def test_full_waiting_queue_is_503_with_retry_after(http):
    long_body = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    waiting_result: dict = {}

    def waiting_request():
        response = http.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
        waiting_result["status"] = response.status_code

    with http.stream("POST", "/v1/completions", json=long_body) as running:
        # NOTE: the iterator must stay referenced: a closed one closes the connection.
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")  # it runs, in the only sequence slot
        waiter = threading.Thread(target=waiting_request)
        waiter.start()
        deadline = time.monotonic() + 30
        while metric(http, "pagoda_num_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = http.post("/v1/completions", json={"prompt": "z", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "server_overloaded"
    # Closing the stream aborted the long request; the waiting one runs and finishes.
    waiter.join(timeout=30)
    assert waiting_result["status"] == 200
    assert metric(http, "pagoda_kv_blocks_used") == 0
