"""compose.yaml (and its GPU and air-gapped overrides) checked without a Docker engine: every
service builds or pulls something that exists, listens where its ports, healthchecks and the
other services' URLs say, publishes on loopback only, starts after what it calls, and its command
line parses with the real CLI. tests/test_compose_stack.py (marked `compose`) runs it for real."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pagoda.adapters.cli import build_parser
from pagoda.adapters.common.engine_args import CPU_THREADS_ENV, MODEL_ENV

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
GPU_OVERRIDE = ROOT / "compose.gpu.yaml"
AIRGAP_OVERRIDE = ROOT / "compose.airgap.yaml"
# ${VAR:-default} as compose interpolates it with VAR unset.
INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")
SERVICE_URL = re.compile(r"https?://([\w{}.-]+):(\d+)")
DOCKERFILE_ARG = re.compile(r"^ARG (\w+)=(\S+)$", re.MULTILINE)
DOCKERFILE_COPY = re.compile(r"^COPY (?!--from)(.+) \S+$", re.MULTILINE)


def load(path: Path, variables: dict[str, str] | None = None) -> dict[str, Any]:
    """The file as compose reads it with `variables` set and every other variable unset."""
    values = variables or {}
    return yaml.safe_load(INTERPOLATION.sub(
        lambda match: values.get(match.group(1), match.group(2)), path.read_text()))


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load(COMPOSE)["services"]


def argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def listening_port(service: dict[str, Any]) -> int:
    """The port the service's process binds in its container."""
    if "command" not in service:  # the Open WebUI image: its documented port
        return 8080
    return int(flag(argv(service), "--port"))


def strings_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings_in(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings_in(value)]
    return [node] if isinstance(node, str) else []


ROUTER_PROFILE = {"pagoda-replica-1", "pagoda-replica-2", "router"}


def test_expected_services(services):
    assert set(services) == {"pagoda", "open-webui", "fastchat-controller", "pagoda-worker",
                             "fastchat-arena", *ROUTER_PROFILE}
    assert services["open-webui"]["image"] == "ghcr.io/open-webui/open-webui:v0.12.4"


def builds(path: Path) -> dict[str, dict[str, Any]]:
    """Each service's build section, merged over compose.yaml's as compose merges overrides."""
    base = load(COMPOSE)["services"]
    return {name: {**base.get(name, {}).get("build", {}), **service["build"]}
            for name, service in load(path)["services"].items() if "build" in service}


def test_builds_and_dockerfiles_exist_and_pin_versions():
    for path in (COMPOSE, GPU_OVERRIDE, AIRGAP_OVERRIDE):
        for name, service in load(path)["services"].items():
            if "build" not in service and "image" in service:
                assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for name, build in builds(path).items():
            context = ROOT / build["context"]
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            text = dockerfile.read_text()
            if dockerfile.name == "Dockerfile.router":  # a Rust binary, no torch
                assert re.search(r"^FROM \S+:\S*\d", text, re.MULTILINE), dockerfile
                assert re.search(r"^RUN pip install sglang-router==\S+$", text, re.MULTILINE)
                assert not re.search(r"^RUN .*\btorch\b", text, re.MULTILINE), dockerfile
                continue
            args = dict(DOCKERFILE_ARG.findall(text))
            # Every stage starts from the one BASE_IMAGE argument, pinned by default.
            assert re.fullmatch(r"\S+:\S*\d\S*", args["BASE_IMAGE"]), dockerfile
            assert set(re.findall(r"^FROM (\S+)", text, re.MULTILINE)) == {"${BASE_IMAGE}"}
            assert "wheelhouse-install.sh torch==2.13.0" in text, dockerfile
            assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
            ignored = (context / ".dockerignore").read_text().splitlines()
            for copied in DOCKERFILE_COPY.findall(text):
                for source in copied.replace("${WHEELHOUSE}", args["WHEELHOUSE"]).split():
                    assert (context / source).exists(), f"{dockerfile}: {source}"
                    # .dockerignore leaves out everything it does not name.
                    assert f"!{source.rstrip('/')}" in ignored, f"{dockerfile}: {source}"


def test_airgap_override_builds_every_image_from_the_local_base():
    sys.path.insert(0, str(ROOT / "integration"))
    from airgap_images import BASE_IMAGE, WHEELHOUSES

    airgap = builds(AIRGAP_OVERRIDE)
    # The router profile is not built air-gapped yet (Dockerfile.router installs from PyPI).
    assert set(airgap) == set(load(COMPOSE)["services"]) - ROUTER_PROFILE
    assert {build["args"]["BASE_IMAGE"] for build in airgap.values()} == {BASE_IMAGE}
    assert load(AIRGAP_OVERRIDE)["services"]["open-webui"]["image"] != (
        load(COMPOSE)["services"]["open-webui"]["image"])  # a local build under its own name
    # Every Dockerfile's default wheelhouse is one the script fills.
    filled = {f"integration/wheelhouse/{wheelhouse.name}" for wheelhouse in WHEELHOUSES}
    for path in (COMPOSE, GPU_OVERRIDE, AIRGAP_OVERRIDE):
        for name, build in builds(path).items():
            if name == "router":
                continue
            folder = ROOT / build["context"]
            text = (folder / build["dockerfile"]).read_text()
            wheelhouse = folder / dict(DOCKERFILE_ARG.findall(text))["WHEELHOUSE"]
            assert str(wheelhouse.relative_to(ROOT)) in filled


def test_ports_and_healthchecks_match_what_each_service_listens_on(services):
    host_ports = []
    for name, service in services.items():
        for mapping in service.get("ports", []):
            address, host, container = mapping.split(":")
            assert address == "127.0.0.1", f"{name} is published beyond this host by default"
            assert int(container) == listening_port(service), name
            host_ports.append(host.rsplit(":", 1)[-1])
        if "healthcheck" in service:
            urls = SERVICE_URL.findall(" ".join(service["healthcheck"]["test"]))
            assert urls == [("127.0.0.1", str(listening_port(service)))], name
    assert len(host_ports) == len(set(host_ports))
    assert services["open-webui"]["ports"] == ["127.0.0.1:3000:8080"]
    assert services["pagoda"]["ports"] == ["127.0.0.1:8000:8000"]
    published = load(COMPOSE, {"PAGODA_PUBLISH_ADDRESS": "0.0.0.0", "OPEN_WEBUI_PORT": "3001"})
    assert published["services"]["open-webui"]["ports"] == ["0.0.0.0:3001:8080"]
    assert "/health'" in services["pagoda"]["healthcheck"]["test"][-1]


def test_urls_name_services_at_their_ports_and_start_after_them(services):
    for name, service in services.items():
        for host, port in SERVICE_URL.findall(" ".join(strings_in(service))):
            if host in ("127.0.0.1", "{hostname}"):
                continue
            assert host in services, f"{name} calls unknown service {host}"
            assert int(port) == listening_port(services[host]), f"{name} -> {host}:{port}"
            if host != name:
                assert host in service.get("depends_on", {}) or name == "pagoda", (
                    f"{name} calls {host} but does not depend on it")
        for target, rule in service.get("depends_on", {}).items():
            assert target in services, name
            assert rule["condition"] in ("service_started", "service_healthy"), name
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"


def test_open_webui_talks_to_pagoda_only(services):
    webui = services["open-webui"]
    assert webui["environment"]["OPENAI_API_BASE_URL"] == "http://pagoda:8000/v1"
    assert webui["environment"]["ENABLE_OLLAMA_API"] == "false"
    assert webui["depends_on"] == {"pagoda": {"condition": "service_healthy"}}


def test_pagoda_commands_parse_with_the_cli(services, monkeypatch):
    serve = build_parser().parse_args(argv(services["pagoda"])[1:])
    assert (serve.command, serve.port, serve.served_model_name[0]) == ("serve", 8000,
                                                                       "vicuna-demo")
    worker = build_parser().parse_args(argv(services["pagoda-worker"])[1:])
    assert worker.worker_address == "http://{hostname}:21002"
    # Scalable: no fixed name and no host port, which replicas would fight over.
    assert not {"container_name", "ports", "hostname"} & set(services["pagoda-worker"])
    for name in ("pagoda", "pagoda-worker"):
        environment = services[name]["environment"]
        assert not environment[MODEL_ENV]  # empty unless set: the demo model
        assert not environment[CPU_THREADS_ENV]  # empty unless set: the usable cores
        assert "/root/.cache/huggingface" in " ".join(services[name]["volumes"])
    extra = load(COMPOSE, {"PAGODA_EXTRA_ARGS": "--max-model-len 160"})["services"]
    for name in ("pagoda", "pagoda-worker"):
        assert build_parser().parse_args(argv(extra[name])[1:]).max_model_len == 160
    monkeypatch.setenv(MODEL_ENV, "org/model")
    monkeypatch.setenv(CPU_THREADS_ENV, "1")
    for name in ("pagoda", "pagoda-worker"):
        args = build_parser().parse_args(argv(services[name])[1:])
        assert (args.model, args.cpu_threads) == ("org/model", 1)


def test_fastchat_commands_use_flags_fastchat_has(services):
    fastchat_serve = Path(pytest.importorskip("fastchat.serve").__file__).parent
    for name in ("fastchat-controller", "fastchat-arena"):
        args = argv(services[name])
        source = (fastchat_serve / f"{flag(args, '-m').split('.')[-1]}.py").read_text()
        for option in (arg for arg in args if arg.startswith("--")):
            assert f'"{option}"' in source, f"{name}: {option}"


def test_router_profile_fronts_two_replicas_on_localhost_only(services):
    for name in ROUTER_PROFILE:
        assert services[name]["profiles"] == ["router"], name
    for name in set(services) - ROUTER_PROFILE:
        assert "profiles" not in services[name], name  # a plain `up` starts what it did
    router = services["router"]
    assert router["ports"] == ["127.0.0.1:30000:30000"]
    args = argv(router)
    # The Prometheus exporter binds 0.0.0.0 unless told otherwise; it is not published.
    assert flag(args, "--prometheus-host") == "127.0.0.1"
    assert flag(args, "--policy") == "cache_aware"
    urls = args[args.index("--worker-urls") + 1:args.index("--policy")]
    assert urls == ["http://pagoda-replica-1:8000", "http://pagoda-replica-2:8000"]
    for name in ("pagoda-replica-1", "pagoda-replica-2"):
        replica = services[name]
        assert "ports" not in replica  # reached through the router only
        serve = build_parser().parse_args(argv(replica)[1:])
        assert (serve.command, serve.host, serve.port) == ("serve", "0.0.0.0", 8000)
        assert replica["environment"] == services["pagoda"]["environment"]
    # The command line parses with the router's own parser, when it is installed here.
    launch_router = pytest.importorskip("sglang_router.launch_router")
    parsed = launch_router.parse_router_args(args[args.index("sglang_router.launch_router") + 1:])
    assert (parsed.host, parsed.port, parsed.prometheus_host) == ("0.0.0.0", 30000, "127.0.0.1")
    assert parsed.worker_urls == urls


def test_gpu_override_reserves_gpus_for_the_pagoda_services(services):
    override = load(GPU_OVERRIDE)["services"]
    assert set(override) == {"pagoda", "pagoda-worker"} <= set(services)
    for service in override.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def compose_client() -> list[str] | None:
    """docker-compose (v1) or the docker compose plugin (v2), whichever is here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False,
                                 capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


def test_docker_compose_config():
    client = compose_client()
    if client is None:
        pytest.skip("no docker compose client")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"],
                  ["compose.yaml", "compose.airgap.yaml"],
                  ["compose.yaml", "compose.airgap.yaml", "compose.gpu.yaml"]):
        checked = subprocess.run(
            [*client, *[arg for file in files for arg in ("-f", file)], "config", "-q"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PAGODA_MODEL": ""},
        )
        assert checked.returncode == 0, checked.stderr
