"""compose.yaml (and its GPU override) checked without a Docker engine: every service builds or
pulls something that exists, listens where its ports, healthchecks and the other services' URLs
say, starts after what it calls, and its command line parses with the real CLI."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pagoda.adapters.cli import build_parser
from pagoda.adapters.common.engine_args import CPU_THREADS_ENV, MODEL_ENV

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
GPU_OVERRIDE = ROOT / "compose.gpu.yaml"
# ${VAR:-default} as compose interpolates it with VAR unset.
INTERPOLATION = re.compile(r"\$\{(\w+):-([^}]*)\}")
SERVICE_URL = re.compile(r"https?://([\w{}.-]+):(\d+)")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(INTERPOLATION.sub(lambda match: match.group(2), path.read_text()))


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


def test_builds_and_dockerfiles_exist_and_pin_versions():
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in load(path)["services"].items():
            build = service.get("build")
            if build is None:
                assert ":" in service["image"] and not service["image"].endswith(":latest"), name
                continue
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            text = dockerfile.read_text()
            assert re.search(r"^FROM \S+:\S*\d", text, re.M), f"{dockerfile} base is not pinned"
            if dockerfile.name == "Dockerfile.router":  # a Rust binary, no torch
                assert re.search(r"^RUN pip install sglang-router==\S+$", text, re.M), dockerfile
                assert not re.search(r"^RUN .*\btorch\b", text, re.M), dockerfile
            else:
                assert "torch==2.13.0 --index-url" in text, dockerfile
            for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
                for source in copied.split():
                    assert (ROOT / build["context"] / source).exists(), f"{dockerfile}: {source}"


def test_ports_and_healthchecks_match_what_each_service_listens_on(services):
    host_ports = []
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host, container = mapping.rsplit(":", 1)  # host: [address:]port
            assert int(container) == listening_port(service), name
            host_ports.append(host.rsplit(":", 1)[-1])
        if "healthcheck" in service:
            urls = SERVICE_URL.findall(" ".join(service["healthcheck"]["test"]))
            assert urls == [("127.0.0.1", str(listening_port(service)))], name
    assert len(host_ports) == len(set(host_ports))
    assert services["open-webui"]["ports"] == ["3000:8080"]
    assert services["pagoda"]["ports"] == ["8000:8000"]
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


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:
        pytest.skip("no docker compose client")
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        checked = subprocess.run(
            [docker, "compose", *[arg for file in files for arg in ("-f", file)], "config", "-q"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PAGODA_MODEL": ""},
        )
        assert checked.returncode == 0, checked.stderr
