from __future__ import annotations

import os
import sys
from pathlib import Path

# transformers (5.25 and later) imports the PyPI package `kernels`. `python -m pytest` puts the
# checkout's root first on sys.path, where Pagoda's own kernels/ folder (installed as
# pagoda.kernels) would shadow it; nothing here imports from the root (pagoda is installed), so
# the root leaves the path, and PYTHONSAFEPATH keeps it off the path of the servers and scripts
# the tests start with `python -m` from the root.
_CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() != _CHECKOUT]
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton decides once per process, when it is first imported, whether kernels are compiled or run
# by its interpreter. Without CUDA they can only be interpreted, so the suite turns the interpreter
# on before anything imports triton (transformers does, hence above the imports below). Only
# triton reads the variable, and only the Triton kernel and backend tests run kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from checkpoints import build_checkpoint
from openai_server import openai_server, tools_server  # noqa: F401  (session servers)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pagoda.backend.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path):
    """checkpoint(variant) -> folder of a tiny random-weight model (built once per session)."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_checkpoint(
                variant, demo_model_dir, tmp_path_factory.mktemp(variant)
            )
        return built[variant]

    return get
