"""Real processes for the FastChat tests: Pagoda workers, FastChat's controller and servers.

Every process listens on a free 127.0.0.1 port, writes its output to a log file (shown when a
wait times out) and is stopped by the fixture that started it, killed if it does not stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from pagoda.backend.demo.builder import CACHE_DIR_ENV, DEFAULT_CACHE_DIR

T = TypeVar("T")

STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedProcess:
    def __init__(
        self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        log = self.log_path.open("ab")
        # NOTE: cwd is the work folder: FastChat's servers write their log files into it.
        self.process = subprocess.Popen(
            self.argv, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Send `sig`, then SIGKILL if the process outlives STOP_TIMEOUT; returns its exit code
        (None when it was gone already). FastChat's controller never exits on SIGTERM alone:
        its heartbeat thread is not a daemon."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(sig)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(STOP_TIMEOUT)

    def log_tail(self, num_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )


def wait_for(
    probe: Callable[[], T | None], timeout: float, what: str,
    processes: tuple[ManagedProcess, ...] = (), interval: float = 0.1,
) -> T:
    """Poll `probe` until it returns something other than None (HTTP errors count as None)."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            process.check_alive()
        try:
            result = probe()
        except httpx.HTTPError:
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in processes)
            raise TimeoutError(f"{what}: not within {timeout} s\n{logs}")
        time.sleep(interval)


def post(url: str, body: Any = None, timeout: float = 30.0) -> Any:
    response = httpx.post(url, json=body, timeout=timeout)
    response.raise_for_status()
    return response.json()


def stream_chunks(url: str, body: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """All chunks of a /worker_generate_stream answer; asserts FastChat's NUL framing."""
    with httpx.stream("POST", url, json=body, timeout=timeout) as response:
        response.raise_for_status()
        raw = response.read()
    assert raw.endswith(b"\0"), raw[-200:]
    return [json.loads(part) for part in raw.split(b"\0")[:-1]]


def start_pagoda_worker(
    workdir: Path, model_dir: Path, port: int, *flags: str, env: dict[str, str] | None = None
) -> ManagedProcess:
    argv = [
        sys.executable, "-m", "pagoda.adapters.cli", "worker", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--device", "cpu",
        *flags,
    ]
    return ManagedProcess(f"pagoda-worker-{port}", argv, workdir, env).start()


def start_controller(workdir: Path, port: int) -> ManagedProcess:
    argv = [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1",
            "--port", str(port)]
    return ManagedProcess(f"controller-{port}", argv, workdir).start()


def controller_models(controller_url: str) -> list[str]:
    return sorted(post(f"{controller_url}/list_models")["models"])


def wait_for_models(
    controller_url: str, names: list[str], timeout: float, processes: tuple[ManagedProcess, ...]
) -> None:
    wait_for(
        lambda: True if set(names) <= set(controller_models(controller_url)) else None,
        timeout, f"{names} registered with {controller_url}", processes,
    )


def wait_for_worker(url: str, process: ManagedProcess, timeout: float = 120.0) -> None:
    wait_for(lambda: post(f"{url}/worker_get_status", timeout=2.0), timeout,
             f"worker at {url}", (process,))


@dataclass
class Deployment:
    """A FastChat controller with one Pagoda worker registered (or registering) with it."""

    workdir: Path
    controller_port: int
    controller: ManagedProcess
    worker: ManagedProcess
    worker_url: str

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def restart_controller(self) -> None:
        self.controller.stop(signal.SIGKILL)
        self.controller = start_controller(self.workdir, self.controller_port)


@contextlib.contextmanager
def fastchat_deployment(
    workdir: Path, model_dir: Path, model_names: list[str], heart_beat_interval: float,
    *worker_flags: str,
) -> Iterator[Deployment]:
    """The worker starts first and must keep trying until the controller (started next) is up;
    the caller waits for the registration."""
    controller_port, worker_port = free_port(), free_port()
    worker = start_pagoda_worker(
        workdir, model_dir, worker_port, "--model-names", ",".join(model_names),
        "--controller-address", f"http://127.0.0.1:{controller_port}", *worker_flags,
        env={"FASTCHAT_WORKER_HEART_BEAT_INTERVAL": str(heart_beat_interval)},
    )
    worker_url = f"http://127.0.0.1:{worker_port}"
    deployment = None
    try:
        wait_for_worker(worker_url, worker)
        deployment = Deployment(workdir, controller_port,
                                start_controller(workdir, controller_port), worker, worker_url)
        yield deployment
    finally:
        if deployment is not None:
            deployment.controller.stop(signal.SIGKILL)
        worker.stop()


def start_fastchat_api_server(python: str, workdir: Path, controller_url: str) -> tuple[
    ManagedProcess, str
]:
    """FastChat's OpenAI API server; returns the process and its /v1 URL once it answers."""
    port = free_port()
    process = ManagedProcess(f"openai-api-server-{port}", [
        python, "-m", "fastchat.serve.openai_api_server", "--host", "127.0.0.1",
        "--port", str(port), "--controller-address", controller_url,
    ], workdir).start()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: httpx.get(f"{url}/models", timeout=5).raise_for_status(), 60,
                 "FastChat's OpenAI API server", (process,))
    except BaseException:
        process.stop()
        raise
    return process, url


def cached_venv(name: str, requirements: list[str], system_site_packages: bool = False) -> str:
    """The Python of a virtual environment holding `requirements`, built on first use under
    $PAGODA_CACHE_DIR/test-venvs and reused (a lock keeps concurrent test runs apart)."""
    key = hashlib.sha256(
        json.dumps([requirements, system_site_packages, sys.version]).encode()
    ).hexdigest()[:12]
    root = Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser() / "test-venvs"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{key}"
    python = target / "bin" / "python"
    with (root / f"{name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "complete").exists():
            return str(python)
        shutil.rmtree(target, ignore_errors=True)
        venv_flags = ["--system-site-packages"] if system_site_packages else []
        subprocess.run([sys.executable, "-m", "venv", *venv_flags, str(target)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", *requirements],
                                 capture_output=True, text=True, timeout=900)
        if install.returncode != 0:
            raise RuntimeError(f"pip install {requirements} failed:\n{install.stdout[-3000:]}"
                               f"\n{install.stderr[-3000:]}")
        (target / "complete").touch()
    return str(python)
