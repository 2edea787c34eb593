"""The demo model: a tiny deterministic Llama checkpoint built locally, with no download."""

from pagoda.backend.demo.builder import DEMO_MODEL_NAME, build_demo_model, demo_model_path

__all__ = ["DEMO_MODEL_NAME", "build_demo_model", "demo_model_path"]
