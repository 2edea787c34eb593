"""One engine serving the OpenAI API and the FastChat worker routes from one in-process app on
127.0.0.1, with a KV pool small enough that long prompts are prefilled in chunks and requests
are preempted: the server of the load and FastChat bad-input tests (a module fixture).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from openai_server import MAX_REQUEST_BYTES, free_port, wait_until_healthy

API_KEY = "load-key"
FASTCHAT_MODEL = "vicuna-load"


@pytest.fixture(scope="module")
def server(demo_model_dir) -> Iterator[tuple[str, Any]]:
    import uvicorn

    from pagoda.adapters.fastchat.conv_template import resolve_conv_template
    from pagoda.adapters.fastchat.worker import FastChatWorker
    from pagoda.adapters.fastchat.worker_app import worker_routes
    from pagoda.adapters.openai import ServerSettings, create_app
    from pagoda.backend import EngineConfig, LLMEngine
    from pagoda.backend.async_engine import AsyncEngine
    from pagoda.backend.engine_client import EngineClient

    # The AsyncEngine is what the tests get: its LLMEngine is checked for leaks.
    engine = AsyncEngine(LLMEngine(EngineConfig(
        model=str(demo_model_dir), dtype="float32", device="cpu", num_kv_blocks=64,
        max_num_batched_tokens=128, max_model_len=512,
    )))
    client = EngineClient(engine)
    client.start()
    worker = FastChatWorker(client, [FASTCHAT_MODEL], resolve_conv_template(None, None, ["x"]))
    settings = ServerSettings(port=free_port(), api_key=API_KEY, uvicorn_log_level="warning")
    app = create_app(client, settings, worker_routes(worker, MAX_REQUEST_BYTES))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port,
                                       log_level="warning", limit_concurrency=1024))
    thread = threading.Thread(target=uv.run, name="load-test-server", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    try:
        wait_until_healthy(base_url)
        yield base_url, engine
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        client.shutdown()
