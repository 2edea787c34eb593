"""Processes the serving benchmarks start: `pagoda serve`, `pagoda worker`, FastChat's controller
and its stock model_worker (in its own environment, transformers<5), each on a free 127.0.0.1
port with its output in a log file, stopped (killed if need be) when the benchmark ends."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from pagoda.backend.demo.builder import CACHE_DIR_ENV, DEFAULT_CACHE_DIR

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0

# FastChat's stock worker: fschat 0.2.36 crashes under transformers 5 (rope_scaling["factor"]),
# so it gets an environment of its own with the last transformers 4 and the same torch.
FASTCHAT_REQUIREMENTS = [
    "torch==2.13.0", "fschat==0.2.36", "transformers>=4.57,<5", "accelerate>=1.0",
    "sentencepiece>=0.2", "protobuf>=4", "psutil>=5", "tokenizers", "uvicorn", "fastapi",
    "pydantic>=2", "requests", "shortuuid", "httpx", "numpy",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_venv(name: str, requirements: list[str]) -> str:
    """The Python of a virtual environment holding `requirements`, built on first use under
    $PAGODA_CACHE_DIR/bench-venvs and reused (a lock keeps concurrent runs apart)."""
    key = hashlib.sha256(json.dumps([requirements, sys.version]).encode()).hexdigest()[:12]
    root = Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser() / "bench-venvs"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{key}"
    python = target / "bin" / "python"
    with (root / f"{name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "complete").exists():
            return str(python)
        shutil.rmtree(target, ignore_errors=True)
        logger.info("building %s (pip install %s)", target, " ".join(requirements))
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", *requirements],
                                 capture_output=True, text=True, timeout=1800, check=False)
        if install.returncode != 0:
            raise RuntimeError(f"pip install {requirements} failed:\n{install.stdout[-3000:]}"
                               f"\n{install.stderr[-3000:]}")
        (target / "complete").touch()
    return str(python)


class ManagedProcess:
    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        log = self.log_path.open("ab")
        # NOTE: cwd is the work folder: FastChat's servers write their log files into it.
        self.process = subprocess.Popen(argv, cwd=workdir, env={**os.environ, **(env or {})},
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT (FastChat's controller ignores SIGTERM:
        its heartbeat thread is not a daemon)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def peak_rss_mib(self) -> float | None:
        """The process's peak resident memory (VmHWM), while it runs; None off Linux."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def wait_until(self, url: str, timeout: float, method: str = "GET") -> None:
        """Poll `url` until it answers 2xx; raise with the log tail if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.request(method, url, timeout=5.0).is_success:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {url} not up within {timeout} s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)


@contextlib.contextmanager
def running(process: ManagedProcess) -> Iterator[ManagedProcess]:
    try:
        yield process
    finally:
        process.stop()


def pagoda_argv(command: str, model_dir: Path, port: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "pagoda.adapters.cli", command, "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu",
            *flags]


def start_pagoda_serve(workdir: Path, model_dir: Path, *flags: str) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(f"pagoda-serve-{port}", pagoda_argv("serve", model_dir, port, *flags),
                             workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(f"{url}/health", timeout=180)
    except BaseException:
        process.stop()
        raise
    return process, url


def start_replicas(workdir: Path, model_dir: Path, count: int,
                   *flags: str) -> list[tuple[ManagedProcess, str]]:
    """`count` `pagoda serve` replicas with the same flags, started together (their model loads
    overlap) and each waited for."""
    ports = [free_port() for _ in range(count)]
    replicas = [(ManagedProcess(f"pagoda-serve-{port}", pagoda_argv("serve", model_dir, port,
                                                                    *flags), workdir),
                 f"http://127.0.0.1:{port}") for port in ports]
    try:
        for process, url in replicas:
            process.wait_until(f"{url}/health", timeout=300)
    except BaseException:
        for process, _ in replicas:
            process.stop()
        raise
    return replicas


def start_controller(python: str, workdir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    process = ManagedProcess(f"controller-{port}", [
        python, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(port)],
        workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until(f"{url}/list_models", timeout=60, method="POST")
    except BaseException:
        process.stop()
        raise
    return process, url


def start_worker(kind: str, python: str, workdir: Path, model_dir: Path, model_name: str,
                 controller_url: str, *flags: str) -> ManagedProcess:
    """`kind` "pagoda" (pagoda worker) or "fastchat" (fastchat.serve.model_worker, transformers
    backend, float32 on CPU); waits until the controller lists `model_name`."""
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    if kind == "pagoda":
        argv = pagoda_argv("worker", model_dir, port, "--model-names", model_name,
                           "--controller-address", controller_url, "--worker-address", address,
                           *flags)
    else:
        argv = [python, "-m", "fastchat.serve.model_worker", "--model-path", str(model_dir),
                "--model-names", model_name, "--device", "cpu", "--host", "127.0.0.1",
                "--port", str(port), "--controller-address", controller_url,
                "--worker-address", address, *flags]
    process = ManagedProcess(f"{kind}-worker-{port}", argv, workdir)
    deadline = time.monotonic() + 300
    try:
        while model_name not in httpx.post(f"{controller_url}/list_models",
                                           timeout=5).json()["models"]:
            if process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} did not register:\n{process.log_tail()}")
            time.sleep(0.3)
    except BaseException:
        process.stop()
        raise
    return process


# The routers' Python modules (pip install sglang-router / vllm-router: the `router` extra).
ROUTER_MODULES = {"sglang": "sglang_router.launch_router", "vllm": "vllm_router.launch_router"}
# Their names for the log level that leaves out per-request lines.
ROUTER_QUIET_LEVELS = {"sglang": "warn", "vllm": "warning"}


def router_installed(kind: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(ROUTER_MODULES[kind].split(".")[0]) is not None


def start_router(kind: str, workdir: Path, worker_urls: list[str], policy: str,
                 quiet: bool = False) -> tuple[ManagedProcess, str]:
    """sglang-router or vllm-router (`kind`) in front of `worker_urls`, its HTTP and Prometheus
    ports on 127.0.0.1 (sglang-router binds 0.0.0.0 unless told); waits until every worker is
    registered and healthy. `quiet` logs warnings only."""
    port, prometheus_port = free_port(), free_port()
    argv = [sys.executable, "-m", ROUTER_MODULES[kind], "--host", "127.0.0.1", "--port",
            str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port",
            str(prometheus_port), "--policy", policy, "--worker-urls", *worker_urls,
            # Workers are up already: check at once, not every 30 s (the default).
            "--worker-startup-check-interval", "1"]
    if quiet:
        argv += ["--log-level", ROUTER_QUIET_LEVELS[kind]]
    process = ManagedProcess(f"{kind}-router-{port}", argv, workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_workers(process, url, len(worker_urls), timeout=120)
    except BaseException:
        process.stop()
        raise
    return process, url


def wait_for_workers(process: ManagedProcess, url: str, num_workers: int,
                     timeout: float) -> None:
    """Until the router's GET /workers lists `num_workers` healthy workers."""
    deadline = time.monotonic() + timeout
    while True:
        if process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.process.returncode}:\n"
                               f"{process.log_tail()}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            workers = httpx.get(f"{url}/workers", timeout=5.0).json().get("workers", [])
            if sum(1 for worker in workers if worker.get("is_healthy")) == num_workers:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name}: {num_workers} workers not healthy within "
                               f"{timeout} s\n{process.log_tail()}")
        time.sleep(0.2)
