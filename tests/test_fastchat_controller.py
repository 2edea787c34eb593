"""Pagoda behind FastChat's own processes: its controller, test_message and its OpenAI API server.

The worker starts before the controller (it must keep trying), serves the demo model under two
names, and sends heartbeats every HEART_BEAT_INTERVAL seconds so a controller restart shows fast.
FastChat's API server streams only under pydantic 1 (fschat 0.2.36 calls pydantic 1's
`.json(ensure_ascii=...)`), so streaming goes through one running in its own environment.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fastchat_processes import (
    Deployment,
    ManagedProcess,
    cached_venv,
    controller_models,
    fastchat_deployment,
    free_port,
    post,
    start_fastchat_api_server,
    stream_chunks,
    wait_for,
    wait_for_models,
)

pytest.importorskip("fastchat", reason="needs fschat (pip install -e '.[test]')")
openai = pytest.importorskip("openai")

NAMES = ["pagoda-demo", "vicuna-demo"]
HEART_BEAT_INTERVAL = 2
# Vicuna v1.1 as FastChat renders a one-question conversation (the demo model's chat format).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
PYDANTIC1_REQUIREMENTS = ["fschat==0.2.36", "pydantic<2", "fastapi==0.115.12"]


@pytest.fixture(scope="module")
def deployment(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    with fastchat_deployment(
        tmp_path_factory.mktemp("fastchat-controller"), demo_model_dir, NAMES,
        HEART_BEAT_INTERVAL, "--num-kv-blocks", "256", "--max-model-len", "1024",
    ) as running:
        yield running


def _api_server(deployment: Deployment, python: str) -> Iterator[str]:
    wait_for_models(deployment.controller_url, NAMES, 30, (deployment.worker,))
    process, url = start_fastchat_api_server(python, deployment.workdir,
                                             deployment.controller_url)
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api_server(deployment: Deployment) -> Iterator[str]:
    yield from _api_server(deployment, sys.executable)


@pytest.fixture(scope="module")
def pydantic1_api_server(deployment: Deployment) -> Iterator[str]:
    yield from _api_server(deployment, cached_venv("fschat-pydantic1", PYDANTIC1_REQUIREMENTS))


def test_worker_registers_once_the_controller_is_up(deployment):
    wait_for_models(deployment.controller_url, NAMES, 30,
                    (deployment.worker, deployment.controller))
    assert set(controller_models(deployment.controller_url)) >= set(NAMES)
    address = post(f"{deployment.controller_url}/get_worker_address", {"model": "vicuna-demo"})
    assert address == {"address": deployment.worker_url}


def test_fastchat_test_message_gets_an_answer(deployment):
    wait_for_models(deployment.controller_url, NAMES, 30, (deployment.worker,))
    result = subprocess.run(
        [sys.executable, "-m", "fastchat.serve.test_message", "--controller-address",
         deployment.controller_url, "--model-name", "vicuna-demo", "--max-new-tokens", "16"],
        cwd=deployment.workdir, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"worker_addr: {deployment.worker_url}" in result.stdout
    answer = result.stdout.split("ASSISTANT: ", 1)[1].strip()
    assert answer, result.stdout


def test_controller_restart_sees_the_worker_within_one_heartbeat(deployment):
    wait_for_models(deployment.controller_url, NAMES, 30, (deployment.worker,))
    deployment.restart_controller()
    wait_for(lambda: post(f"{deployment.controller_url}/list_models"), 30,
             "restarted controller", (deployment.controller,))
    restarted = time.monotonic()
    # One heartbeat interval, plus time for the heartbeat and the registration themselves.
    wait_for_models(deployment.controller_url, NAMES, HEART_BEAT_INTERVAL + 3,
                    (deployment.worker, deployment.controller))
    assert time.monotonic() - restarted <= HEART_BEAT_INTERVAL + 3


def test_chat_completion_through_fastchat_api_server(deployment, api_server):
    client = openai.OpenAI(base_url=api_server, api_key="none", max_retries=0)
    assert {model.id for model in client.models.list()} >= set(NAMES)
    completion = client.chat.completions.create(
        model="vicuna-demo", messages=[{"role": "user", "content": "Hi there"}], max_tokens=8,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1
    # The API server built its prompt from the worker's template: the answer is the one the
    # worker gives for the Vicuna prompt.
    direct = post(f"{deployment.worker_url}/worker_generate", {
        "model": "vicuna-demo", "prompt": f"{VICUNA_SYSTEM} USER: Hi there ASSISTANT:",
        "temperature": 0, "max_new_tokens": 8, "echo": False,
    })
    assert choice.message.content == direct["text"]


def test_completion_through_fastchat_api_server(api_server):
    client = openai.OpenAI(base_url=api_server, api_key="none", max_retries=0)
    completion = client.completions.create(
        model="pagoda-demo", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=1,
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens >= 4
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == completion.usage.completion_tokens


def test_embeddings_through_fastchat_api_server(deployment, api_server):
    client = openai.OpenAI(base_url=api_server, api_key="none", max_retries=0)
    texts = ["FastChat batches texts", "for the worker"]
    # The SDK asks for base64: FastChat passes encoding_format on and the worker encodes.
    response = client.embeddings.create(model="pagoda-demo", input=texts)
    direct = post(f"{deployment.worker_url}/worker_get_embeddings",
                  {"model": "pagoda-demo", "input": texts})
    assert [item.index for item in response.data] == [0, 1]
    for item, vector in zip(response.data, direct["embedding"]):
        assert item.embedding == pytest.approx(vector, abs=1e-6)
    assert response.usage.prompt_tokens == direct["token_num"]


def test_worker_errors_reach_the_api_client(api_server):
    client = openai.OpenAI(base_url=api_server, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="pagoda-demo", prompt="Hi", max_tokens=4,
                                  extra_body={"best_of": 10**6})
    assert caught.value.body["code"] == 40302  # FastChat's ErrorResponse carries the code
    assert "best_of" in caught.value.body["message"]


def test_streaming_through_fastchat_api_server_under_pydantic1(pydantic1_api_server):
    client = openai.OpenAI(base_url=pydantic1_api_server, api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="vicuna-demo", messages=messages,
                                           max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="vicuna-demo", messages=messages,
                                                 max_tokens=12, temperature=0, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(deltas) >= 2
    # FastChat's API server drops U+FFFD from streamed text only; the random demo model can
    # produce it (a byte-fallback token that completes no character).
    assert "".join(deltas) == whole.choices[0].message.content.replace("\ufffd", "")
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    pieces = list(client.completions.create(model="pagoda-demo", prompt="Once upon a time",
                                            max_tokens=8, temperature=0, stream=True))
    text = client.completions.create(model="pagoda-demo", prompt="Once upon a time",
                                     max_tokens=8, temperature=0).choices[0].text
    assert "".join(p.choices[0].text for p in pieces) == text.replace("\ufffd", "")
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_pagoda_serve_speaks_both_protocols_from_one_engine(deployment, demo_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess("pagoda-serve", [
        sys.executable, "-m", "pagoda.adapters.cli", "serve", "--model", str(demo_model_dir),
        "--served-model-name", "vicuna-serve", "--host", "127.0.0.1", "--port", str(port),
        "--fastchat-controller", deployment.controller_url, "--num-kv-blocks", "256",
        "--dtype", "float32", "--device", "cpu", "--uvicorn-log-level", "warning",
    ], deployment.workdir, env={"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(HEART_BEAT_INTERVAL)})
    process.start()
    try:
        wait_for_models(deployment.controller_url, ["vicuna-serve"], 120, (process,))
        address = post(f"{deployment.controller_url}/get_worker_address", {"model": "vicuna-serve"})
        assert address == {"address": url}
        # An OpenAI stream in flight is in the queue the worker reports: one engine serves both.
        body = {"model": "vicuna-serve", "prompt": "Hello", "max_tokens": 1000, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert post(f"{url}/worker_get_status")["queue_length"] == 1
        prompt = {"prompt": "Once upon a time", "temperature": 0}
        chunks = stream_chunks(f"{url}/worker_generate_stream",
                               {**prompt, "model": "vicuna-serve", "max_new_tokens": 8,
                                "echo": False})
        openai_answer = httpx.post(f"{url}/v1/completions", json={
            **prompt, "model": "vicuna-serve", "max_tokens": 8,
        }, timeout=60).json()
        assert chunks[-1]["text"] == openai_answer["choices"][0]["text"]
        assert chunks[-1]["finish_reason"] == openai_answer["choices"][0]["finish_reason"]
    finally:
        process.stop()
