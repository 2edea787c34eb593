from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Imported before transformers: it takes the checkout's root off sys.path, where `python -m
# pytest` put it and where Pagoda's kernels/ folder would shadow the PyPI package `kernels`.
import pagoda.backend  # noqa: F401

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
