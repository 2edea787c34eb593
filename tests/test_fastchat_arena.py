"""FastChat's Gradio multi-tab web server (gradio 5.50.0, its own environment) in arena mode, with
two models that Pagoda serves: both are listed and both sides of a battle stream an answer."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fastchat_processes import (
    Deployment,
    ManagedProcess,
    cached_venv,
    fastchat_deployment,
    free_port,
    wait_for,
    wait_for_models,
)

pytestmark = pytest.mark.slow

# FastChat's UI picks prompt formats by model name: both names get Vicuna's, the demo's format.
NAMES = ["vicuna-demo", "vicuna-demo-2"]
# The arena imports fastchat.model (torch, transformers): they come from the test environment.
GRADIO_REQUIREMENTS = ["fschat==0.2.36", "gradio==5.50.0", "plotly", "pytz"]
CLIENT = Path(__file__).with_name("fastchat_arena_client.py")


@pytest.fixture(scope="module")
def deployment(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    with fastchat_deployment(tmp_path_factory.mktemp("fastchat-arena"), demo_model_dir, NAMES,
                             45, "--num-kv-blocks", "256") as running:
        yield running


@pytest.fixture(scope="module")
def gradio_python() -> str:
    return cached_venv("fschat-gradio", GRADIO_REQUIREMENTS, system_site_packages=True)


def test_arena_lists_both_models_and_both_sides_stream(deployment, gradio_python):
    # The web server lists the workers registered when it starts.
    wait_for_models(deployment.controller_url, NAMES, 30, (deployment.worker,))
    port = free_port()
    web = ManagedProcess("gradio-web-server", [
        gradio_python, "-m", "fastchat.serve.gradio_web_server_multi", "--host", "127.0.0.1",
        "--port", str(port), "--controller-url", deployment.controller_url,
    ], deployment.workdir, env={"GRADIO_ANALYTICS_ENABLED": "False"}).start()
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: httpx.get(url, timeout=5).raise_for_status(), 120, "Gradio arena",
                 (web,))
        played = subprocess.run([gradio_python, str(CLIENT), url, "Hello, who are you?"],
                                capture_output=True, text=True, timeout=300)
        assert played.returncode == 0, played.stderr[-3000:] + web.log_tail()
    finally:
        web.stop()
    seen = json.loads(played.stdout.strip().splitlines()[-1])
    assert all(name in json.dumps(seen["loaded"]) for name in NAMES)
    for side in range(2):
        texts = [update[side] for update in seen["updates"]]
        assert texts[-1], f"side {side} gave no answer"
        assert len({text for text in texts if text}) >= 2, f"side {side} did not stream: {texts}"
