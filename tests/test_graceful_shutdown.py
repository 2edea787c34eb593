"""SIGTERM on `pagoda serve` and `pagoda worker` as real subprocesses: new requests get 503,
/health says draining, requests in flight finish, then the process exits 0; past
--shutdown-timeout the requests left are cut and it still exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from openai_server import free_port, wait_until_healthy

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--num-kv-blocks", "300",
                "--max-model-len", "4096"]


def start(demo_model_dir: Path, command: str, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([
        sys.executable, "-m", "pagoda.adapters.cli", command, "--model", str(demo_model_dir),
        "--port", str(port), *ENGINE_FLAGS, *flags,
    ])
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_draining(base_url: str, timeout: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{base_url}/health", timeout=5)
        if health.status_code == 503:
            return health
        time.sleep(0.05)
    raise AssertionError("the server never reported draining")


def test_serve_drains_then_exits_0(demo_model_dir, processes):
    process, base_url = start(demo_model_dir, "serve", "--shutdown-timeout", "60",
                              "--uvicorn-log-level", "warning")
    processes.append(process)
    wait_until_healthy(base_url, timeout=120)
    # Long enough to be still running while the test checks the refusals (a few seconds).
    body = {"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        process.send_signal(signal.SIGTERM)
        assert wait_until_draining(base_url).json() == {"status": "draining"}
        refused = httpx.post(f"{base_url}/v1/completions", json={"prompt": "x"}, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert refused.headers["retry-after"]
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 600
    assert process.wait(timeout=30) == 0


def test_serve_cuts_requests_past_the_shutdown_timeout(demo_model_dir, processes):
    process, base_url = start(demo_model_dir, "serve", "--shutdown-timeout", "1",
                              "--uvicorn-log-level", "warning")
    processes.append(process)
    wait_until_healthy(base_url, timeout=120)
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        # The stream is cut short, and its last event before [DONE] tells the client why.
        events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "the engine shut down" in json.loads(events[-2][len("data: "):])["error"]["message"]
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - started < 15


def test_worker_drains_then_exits_0(demo_model_dir, processes):
    process, base_url = start(demo_model_dir, "worker", "--no-register",
                              "--shutdown-timeout", "60")
    processes.append(process)
    deadline = time.monotonic() + 120
    while True:  # the worker has no /health: its status endpoint answers once it listens
        try:
            httpx.post(f"{base_url}/worker_get_status", timeout=2).raise_for_status()
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
    body = {"prompt": "Once upon a time", "max_new_tokens": 600, "temperature": 0, "echo": False}
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", "/worker_generate_stream", json=body) as response:
        raw = response.iter_raw()
        buffer = next(raw)
        process.send_signal(signal.SIGTERM)
        wait_until_draining(base_url)
        refused = httpx.post(f"{base_url}/worker_generate", json=body, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error_code"] == 42903
        buffer += b"".join(raw)
    last = json.loads(buffer.rstrip(b"\0").split(b"\0")[-1])
    assert last["error_code"] == 0 and last["finish_reason"] == "length"
    assert process.wait(timeout=30) == 0
