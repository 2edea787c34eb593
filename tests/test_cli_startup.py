"""Start-up errors of `pagoda serve` and `pagoda worker`, run as users run them (subprocesses):
one line saying what was wrong and what to do, a non-zero exit, and a busy port found before the
model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from openai_server import free_port

COMMANDS = {"serve": [], "worker": ["--no-register"]}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagoda.adapters.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """What the user sees besides progress logs (INFO lines)."""
    return [line for line in done.stderr.splitlines() if line and not line.startswith("INFO")]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_model_folder_is_one_line(command: str, tmp_path: Path):
    missing = tmp_path / "no-such-model"
    done = run_cli(command, *COMMANDS[command], "--model", str(missing),
                   "--port", str(free_port()))
    assert done.returncode == 2
    assert error_lines(done) == [
        f"pagoda {command}: error: model {str(missing)!r} is not a folder: pass a Hugging Face "
        "checkpoint folder (config.json, tokenizer and *.safetensors) or a hub id such as "
        f"Qwen/Qwen2.5-0.5B-Instruct (see pagoda {command} --help)"
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_folder_without_a_checkpoint_is_one_line(command: str, tmp_path: Path):
    done = run_cli(command, *COMMANDS[command], "--model", str(tmp_path),
                   "--port", str(free_port()))
    assert done.returncode == 2
    [line] = error_lines(done)
    assert line.startswith(f"pagoda {command}: error: model folder {str(tmp_path)!r} has no "
                           "config.json: pass a Hugging Face checkpoint folder")


def test_a_checkpoint_that_cannot_load_is_one_line(demo_model_dir: Path, tmp_path: Path):
    """Past the quick checks: the model's own files are wrong (here, its weights are missing)."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((demo_model_dir / name).read_bytes())
    done = run_cli("serve", "--model", str(tmp_path), "--port", str(free_port()))
    assert done.returncode == 1
    assert error_lines(done) == [
        f"pagoda serve: error: no model weights (*.safetensors) found in {tmp_path}"
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_busy_port_is_found_before_the_model_loads(command, busy_port, demo_model_dir):
    done = run_cli(command, *COMMANDS[command], "--model", str(demo_model_dir),
                   "--port", str(busy_port))
    assert done.returncode == 1
    assert error_lines(done) == [
        f"pagoda {command}: error: cannot listen on 127.0.0.1:{busy_port} (Address already in "
        "use): stop what uses it or choose another --port"
    ]
    # Nothing was loaded: the engine logs its model and KV cache as it builds them.
    assert "loaded" not in done.stderr and "KV cache" not in done.stderr


def test_a_bad_flag_value_is_one_line():
    done = run_cli("serve", "--max-num-seqs", "0", "--port", str(free_port()))
    assert done.returncode == 2
    assert error_lines(done) == ["pagoda serve: error: max_num_seqs must be a positive integer, "
                                 "got 0 (see pagoda serve --help)"]
