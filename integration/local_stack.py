"""compose.yaml's topology as local processes on 127.0.0.1, for machines without Docker:
`pagoda serve` (OpenAI API, also registered as a FastChat worker), FastChat's controller, Pagoda
FastChat workers, FastChat's Gradio arena, and optionally Open WebUI in front of `pagoda serve`.

    python integration/local_stack.py [--workers 2] [--fastchat-python PY] [--open-webui BIN]

It waits until everything answers, prints the URLs, and stops everything on Ctrl-C (or after
--duration seconds). The browser tests start the same stack through `Stack`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger("local_stack")

SERVE_MODEL_NAME = "vicuna-demo"  # FastChat's UIs choose the prompt format from the name
WORKER_MODEL_NAME = "vicuna-demo-worker"
# A small KV cache: several engines share one machine here.
DEFAULT_ENGINE_ARGS = "--num-kv-blocks 256"
STOP_SECONDS = 10.0
READY_SECONDS = 300.0


@dataclass
class Ports:
    pagoda: int = 8000
    controller: int = 21001
    first_worker: int = 21002
    arena: int = 7860
    open_webui: int = 3000


@dataclass
class Stack:
    workdir: Path
    ports: Ports = field(default_factory=Ports)
    workers: int = 1
    fastchat_python: str = sys.executable  # needs fschat 0.2.36 (+ gradio 5.50.0 for the arena)
    open_webui: str | None = None  # the `open-webui` executable of its own environment
    engine_args: list[str] = field(default_factory=lambda: shlex.split(DEFAULT_ENGINE_ARGS))
    arena: bool = True
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def urls(self) -> dict[str, str]:
        urls = {
            "OpenAI API": f"http://127.0.0.1:{self.ports.pagoda}/v1",
            "FastChat controller": self.controller_url,
        }
        if self.arena:
            urls["FastChat arena"] = f"http://127.0.0.1:{self.ports.arena}/"
        if self.open_webui:
            urls["Open WebUI"] = f"http://127.0.0.1:{self.ports.open_webui}/"
        return urls

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.controller}"

    def start(self) -> Stack:
        """Starts each service once what it calls answers; stops all of them on failure."""
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self) -> None:
        self._spawn("controller", [self.fastchat_python, "-m", "fastchat.serve.controller",
                                   "--host", "127.0.0.1", "--port", str(self.ports.controller)])
        self._wait("controller", lambda: httpx.get(f"{self.controller_url}/test_connection"))
        self._spawn("pagoda", ["pagoda", "serve", "--port", str(self.ports.pagoda),
                               "--served-model-name", SERVE_MODEL_NAME,
                               "--fastchat-controller", self.controller_url, *self.engine_args])
        for index in range(self.workers):
            port = self.ports.first_worker + index
            self._spawn(f"worker-{index}", [
                "pagoda", "worker", "--port", str(port), "--model-names", WORKER_MODEL_NAME,
                "--controller-address", self.controller_url, *self.engine_args,
            ])
        self._wait("pagoda", lambda: httpx.get(
            f"http://127.0.0.1:{self.ports.pagoda}/health").raise_for_status())
        self._wait("workers", self._all_registered)
        if self.arena:
            self._spawn("arena", [
                self.fastchat_python, "-m", "fastchat.serve.gradio_web_server_multi",
                "--host", "127.0.0.1", "--port", str(self.ports.arena),
                "--controller-url", self.controller_url,
            ], {"GRADIO_ANALYTICS_ENABLED": "False"})
        if self.open_webui:
            self._spawn("open-webui", [self.open_webui, "serve", "--host", "127.0.0.1",
                                       "--port", str(self.ports.open_webui)],
                        open_webui_env(self.ports.pagoda, self.workdir / "open-webui-data"))
        for name, url in self.urls.items():
            if name not in ("OpenAI API", "FastChat controller"):
                self._wait(name, lambda url=url: httpx.get(url).raise_for_status())

    def _all_registered(self) -> bool | None:
        """True once the controller lists both names (the arena lists what it knows at start)."""
        models = httpx.post(f"{self.controller_url}/list_models").json()["models"]
        return True if {SERVE_MODEL_NAME, WORKER_MODEL_NAME} <= set(models) else None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / f"{name}.log").open("ab") as log:
            # NOTE: cwd is the work folder: FastChat's servers write their own logs there.
            self.processes[name] = subprocess.Popen(
                argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def _wait(self, what: str, probe: Callable[[], object]) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log(name)}")
            try:
                if probe() is not None:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready within {READY_SECONDS} s")
            time.sleep(0.2)

    def log(self, name: str, num_chars: int = 4000) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-num_chars:]

    def stop(self) -> None:
        """SIGTERM in reverse start order, SIGKILL for what outlives STOP_SECONDS (FastChat's
        controller ignores SIGTERM: its heartbeat thread is not a daemon)."""
        for name, process in reversed(list(self.processes.items())):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop on SIGTERM; killing it", name)
                    process.kill()
                    process.wait(STOP_SECONDS)
        self.processes.clear()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def open_webui_env(pagoda_port: int, data_dir: Path) -> dict[str, str]:
    """Open WebUI 0.12.4 offline, with no login, talking only to Pagoda."""
    return {
        "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "RAG_EMBEDDING_MODEL": "",
        "ENABLE_OLLAMA_API": "false", "WEBUI_AUTH": "False", "WEBUI_SECRET_KEY": "local-stack",
        "OPENAI_API_BASE_URL": f"http://127.0.0.1:{pagoda_port}/v1", "OPENAI_API_KEY": "unused",
        "DATA_DIR": str(data_dir), "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ANONYMIZED_TELEMETRY": "false", "DO_NOT_TRACK": "true",
        # Open WebUI 0.12.4 sends its built-in tools with every chat from its UI (tool_choice
        # "auto"); their schemas, ~12,000 tokens, would not fit the demo model's context.
        "DEFAULT_MODEL_METADATA": '{"capabilities": {"builtin_tools": false}}',
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fastchat-python", default=sys.executable,
                        help="Python with fschat==0.2.36 and gradio==5.50.0")
    parser.add_argument("--open-webui", default=None, help="the open-webui executable to start")
    parser.add_argument("--no-arena", action="store_true")
    parser.add_argument("--engine-args", default=DEFAULT_ENGINE_ARGS)
    parser.add_argument("--duration", type=float, default=None,
                        help="stop after this many seconds (default: on Ctrl-C)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    workdir = Path(tempfile.mkdtemp(prefix="pagoda-stack-"))
    stack = Stack(workdir, workers=args.workers, fastchat_python=args.fastchat_python,
                  open_webui=args.open_webui, engine_args=shlex.split(args.engine_args),
                  arena=not args.no_arena)
    # SIGTERM too, so that a supervisor stopping this script stops the whole stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with stack:
        for name, url in stack.urls.items():
            logger.info("%-20s %s", name, url)
        logger.info("logs in %s; Ctrl-C stops everything", workdir)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
