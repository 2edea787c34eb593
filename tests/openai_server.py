"""A real uvicorn server with the OpenAI-compatible API, on a free 127.0.0.1 port, in a thread.

In-process (not a subprocess) so tests can look at the engine behind it: after the session the
fixture checks that no request and no KV block was leaked.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

API_KEY = "test-key"
MODEL_NAME = "pagoda-test"
MAX_MODEL_LEN = 512
TOOLS_MAX_MODEL_LEN = 2048
MAX_REQUEST_BYTES = 256 * 1024


@dataclass
class RunningServer:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str
    engine: object  # the AsyncEngine behind the server's EngineClient (for leak checks)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def tokenize(self, messages: list[dict[str, Any]], **fields: Any) -> str:
        """The prompt the server renders for `messages` (through /tokenize and /detokenize)."""
        body = {"messages": messages, **fields}
        tokens = httpx.post(f"{self.base_url}/tokenize", json=body, headers=self.headers)
        tokens.raise_for_status()
        text = httpx.post(f"{self.base_url}/detokenize", json={"tokens": tokens.json()["tokens"]},
                          headers=self.headers)
        text.raise_for_status()
        return text.json()["prompt"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no healthy server at {base_url} after {timeout} s")


@pytest.fixture(scope="session")
def openai_server(demo_model_dir: Path) -> Iterator[RunningServer]:
    with running_server(demo_model_dir) as server:
        yield server


@pytest.fixture(scope="session")
def tools_server(demo_model_dir: Path) -> Iterator[RunningServer]:
    """For tool calling: tool_choice "auto" read as the demo template writes calls (hermes), and
    room for the tool definitions the template lists (the demo tokenizer spends many tokens on
    JSON)."""
    with running_server(demo_model_dir, TOOLS_MAX_MODEL_LEN, enable_auto_tool_choice=True,
                        tool_call_parser="hermes") as server:
        yield server


@contextlib.contextmanager
def running_server(
    demo_model_dir: Path, max_model_len: int = MAX_MODEL_LEN, **settings_overrides: Any
) -> Iterator[RunningServer]:
    """A server on the demo model with these ServerSettings; on leaving, checks that no request
    and no KV block was left behind."""
    import uvicorn

    from pagoda.adapters.openai import ServerSettings, create_app
    from pagoda.backend import EngineConfig, LLMEngine
    from pagoda.backend.async_engine import AsyncEngine
    from pagoda.backend.engine_client import EngineClient

    engine = AsyncEngine(LLMEngine(EngineConfig(
        model=str(demo_model_dir), dtype="float32", device="cpu", num_kv_blocks=512,
        max_model_len=max_model_len,
    )))
    client = EngineClient(engine)
    client.start()
    settings = ServerSettings(
        port=free_port(), served_model_names=[MODEL_NAME], api_key=API_KEY,
        max_request_bytes=MAX_REQUEST_BYTES, uvicorn_log_level="warning", **settings_overrides,
    )
    server = uvicorn.Server(uvicorn.Config(
        create_app(client, settings), host="127.0.0.1", port=settings.port,
        log_level=settings.uvicorn_log_level,
    ))
    thread = threading.Thread(target=server.run, name="openai-test-server", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_until_healthy(base_url)
        yield RunningServer(base_url, API_KEY, MODEL_NAME, engine)
        # Checked before the server stops, which would abort whatever a test left running.
        wait_until_idle(engine)
        engine.engine.check_no_leaks()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        client.shutdown()


def wait_until_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.engine.has_unfinished_requests() or engine.snapshot.num_kv_blocks_used:
        assert time.monotonic() < deadline, "requests still running after the tests"
        time.sleep(0.05)


@contextlib.contextmanager
def pagoda_serve(*args: str) -> Iterator[str]:
    """`pagoda serve ARGS` as users start it, a subprocess on a free port; yields its base URL.
    Ctrl-C stops it at the end, which must be a clean exit."""
    port = free_port()
    command = [sys.executable, "-m", "pagoda.adapters.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, timeout=120)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=30) == 0
        finally:
            process.kill()
