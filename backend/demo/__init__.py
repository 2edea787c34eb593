"""The demo model: a tiny deterministic Llama checkpoint built locally, with no download."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagoda.backend.lazy import lazy_attributes

if TYPE_CHECKING:
    from pagoda.backend.demo.builder import build_demo_model, demo_model_path

# Here rather than in builder.py: the servers' flags name it, and their --help must not import
# the builder's torch, transformers and sentencepiece.
DEMO_MODEL_NAME = "pagoda-demo"

__getattr__ = lazy_attributes(__name__, {
    "build_demo_model": "pagoda.backend.demo.builder",
    "demo_model_path": "pagoda.backend.demo.builder",
})

__all__ = ["DEMO_MODEL_NAME", "build_demo_model", "demo_model_path"]
