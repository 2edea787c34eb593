from __future__ import annotations

from pathlib import Path

import pytest

from checkpoints import build_checkpoint


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
