"""compose.yaml run for real (marked `compose`; `python -m pytest -m compose`, as root): the
images are prepared the air-gapped way (integration/airgap_images.py: a debootstrap base image
and wheelhouses; it runs anywhere, with or without image pulls) and built by compose with
compose.airgap.yaml; the stack comes up, Open WebUI streams an answer in a headless Chromium,
FastChat's arena has both Pagoda models answer a battle, `--scale pagoda-worker=2` registers two
workers with the controller, and `down -v` leaves no container, network or volume behind.

Starts dockerd when no Docker engine answers (and stops it at the end); uses docker-compose (v1)
or `docker compose` (v2), whichever is there. The stack runs as its own compose project on free
host ports, each published on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright")

from browser_steps import (
    CHROMIUM,
    assert_streamed,
    chat_in_open_webui,
    chromium_context,
)
from fastchat_processes import free_port

# The first test's setup builds everything: pytest-timeout counts fixtures in.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parent.parent
ARENA_CLIENT = Path(__file__).with_name("fastchat_arena_client.py")
PROJECT = "pagoda-compose-test"
COMPOSE_FILES = ["compose.yaml", "compose.airgap.yaml"]
# The service published, the variable compose.yaml reads its host port from, its container port.
PUBLISHED = {"pagoda": ("PAGODA_PORT", 8000), "open-webui": ("OPEN_WEBUI_PORT", 8080),
             "fastchat-controller": ("FASTCHAT_CONTROLLER_PORT", 21001),
             "fastchat-arena": ("FASTCHAT_ARENA_PORT", 7860)}
MODEL_NAMES = ["vicuna-demo", "vicuna-demo-worker"]  # compose.yaml's defaults
# Two cores shared by three engines and their neighbours: one torch thread each. Short answers:
# Open WebUI asks for no max_tokens, so an answer (and its title) runs to the context's end.
STACK_ENV = {"PAGODA_CPU_THREADS": "1",
             "PAGODA_EXTRA_ARGS": "--max-model-len 160 --num-kv-blocks 256"}
# The first visitor of a fresh Open WebUI would create its admin account: not Pagoda's part.
TEST_OVERRIDE = """services:
  open-webui:
    environment:
      WEBUI_AUTH: "False"
"""
PROMPT = "Hello! What is a paged KV cache?"
DOCKERD_START_SECONDS = 60
BUILD_SECONDS = 3600  # a first build installs three Python environments, Open WebUI's ~3 GB
READY_SECONDS = 900  # the first start builds the demo model in each engine
DOCKERD_STOP_SECONDS = 30


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], check=False, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker engine: the one there is, or a dockerd started here and stopped after."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io docker-compose)")
    if docker_answers():
        yield
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists() or os.geteuid() != 0:
        pytest.skip("no Docker engine running, and none can be started here (dockerd as root)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("wb") as output:
        daemon = subprocess.Popen([dockerd], stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DOCKERD_START_SECONDS
        while not docker_answers():
            assert daemon.poll() is None, f"dockerd exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"dockerd not up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(DOCKERD_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def compose_client() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], check=False,
                      capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no docker-compose (v1) nor docker compose plugin (v2)")


@dataclass
class Compose:
    argv: list[str]  # the client with this project's name and files
    env: dict[str, str]
    ports: dict[str, int]  # the host port of each published service

    def __call__(self, *args: str, timeout: float = 600,
                 stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.argv, *args], cwd=ROOT, env=self.env, input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    def containers(self, service: str) -> list[dict]:
        ids = self("ps", "-q", service).stdout.split()
        return json.loads(docker("inspect", *ids)) if ids else []

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "40").stdout


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def project_leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {kind: docker(*command, "-q", "--filter", label).split()
            for kind, command in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                  ("volumes", ["volume", "ls"]))}


def wait_until(probe, timeout: float, what: str, compose: Compose) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{compose.logs()}")
        time.sleep(2)


def healthy(compose: Compose, service: str, replicas: int = 1) -> bool:
    states = [container["State"].get("Health", {}).get("Status")
              for container in compose.containers(service)]
    return states.count("healthy") == replicas


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def compose(docker_engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    """The stack, up and answering; taken down with its volumes afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    subprocess.run([sys.executable, str(ROOT / "integration" / "airgap_images.py")], check=True,
                   timeout=BUILD_SECONDS)
    override = tmp_path_factory.mktemp("compose") / "compose.test.yaml"
    override.write_text(TEST_OVERRIDE)
    files = [arg for name in [*COMPOSE_FILES, str(override)] for arg in ("-f", name)]
    ports = {service: free_port() for service in PUBLISHED}
    env = {**os.environ, **STACK_ENV,
           **{PUBLISHED[service][0]: str(port) for service, port in ports.items()}}
    stack = Compose([*compose_client(), "-p", PROJECT, *files], env, ports)
    stack("build", timeout=BUILD_SECONDS)
    try:
        stack("up", "-d", timeout=READY_SECONDS)
        for service in ("fastchat-controller", "pagoda", "pagoda-worker"):
            wait_until(lambda name=service: healthy(stack, name), READY_SECONDS, service, stack)
        for service, path in (("open-webui", "/health"), ("fastchat-arena", "/")):
            url = f"http://127.0.0.1:{ports[service]}{path}"
            wait_until(lambda page=url: answers(page), READY_SECONDS, url, stack)
        yield stack
    finally:
        stack("down", "-v", "--remove-orphans", timeout=300)


def test_only_the_published_ports_on_loopback_and_one_network(compose):
    for service in ("pagoda", "open-webui", "fastchat-controller", "pagoda-worker",
                    "fastchat-arena"):
        for container in compose.containers(service):
            bound = {port: bindings for port, bindings in container["NetworkSettings"]["Ports"]
                     .items() if bindings}
            expected = ({f"{PUBLISHED[service][1]}/tcp": [
                {"HostIp": "127.0.0.1", "HostPort": str(compose.ports[service])}]}
                if service in PUBLISHED else {})
            assert bound == expected, service
            assert list(container["NetworkSettings"]["Networks"]) == [f"{PROJECT}_default"]


def test_open_webui_streams_an_answer_in_a_browser(compose):
    with chromium_context() as context:
        answer = chat_in_open_webui(context.new_page(),
                                    f"http://127.0.0.1:{compose.ports['open-webui']}",
                                    MODEL_NAMES[0], PROMPT)
    assert_streamed(answer)


def test_pagoda_constrains_an_answer_to_a_json_schema(compose):
    """Structured outputs in the CPU image, which leaves out triton (xgrammar's CUDA kernel)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = httpx.post(f"http://127.0.0.1:{compose.ports['pagoda']}/v1/chat/completions", json={
        "model": MODEL_NAMES[0], "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32, "response_format": {
            "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}},
        timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].lstrip().startswith("{")


def play_arena(compose: Compose) -> dict:
    """One battle, played by FastChat's arena client inside the arena's own container (gradio's
    client is there) against the arena on the container's loopback."""
    played = compose("exec", "-T", "fastchat-arena", "python", "-", "http://127.0.0.1:7860/",
                     PROMPT, stdin=ARENA_CLIENT.read_text(), timeout=300)
    return json.loads(played.stdout.strip().splitlines()[-1])


def test_arena_battle_both_pagoda_models_answer(compose):
    seen = play_arena(compose)
    assert all(name in json.dumps(seen["loaded"]) for name in MODEL_NAMES)
    for side in range(2):
        texts = [update[side] for update in seen["updates"]]
        assert texts[-1], f"side {side} gave no answer"
        assert len({text for text in texts if text}) >= 2, f"side {side} did not stream: {texts}"


def test_scaled_workers_each_register_with_the_controller(compose):
    compose("up", "-d", "--scale", "pagoda-worker=2", timeout=READY_SECONDS)
    wait_until(lambda: healthy(compose, "pagoda-worker", replicas=2), READY_SECONDS,
               "two healthy workers", compose)
    addresses = {f"http://{container['Config']['Hostname']}:21002"
                 for container in compose.containers("pagoda-worker")}
    assert len(addresses) == 2

    def registered() -> set[str]:
        log = compose("logs", "--no-color", "fastchat-controller").stdout
        return {address for address in addresses if f"Register done: {address}," in log}

    wait_until(lambda: registered() == addresses, 60, "both workers registered", compose)
    controller = f"http://127.0.0.1:{compose.ports['fastchat-controller']}"
    models = httpx.post(f"{controller}/list_models", timeout=10).json()["models"]
    assert sorted(models) == MODEL_NAMES


def test_down_leaves_nothing_behind(compose):
    compose("down", "-v", "--remove-orphans", timeout=300)
    assert project_leftovers() == {"containers": [], "networks": [], "volumes": []}
