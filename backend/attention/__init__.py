"""Attention backends behind one interface; `get_attention_backend` picks one for a device."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from pagoda.backend.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    BatchLayout,
    DecodeBatch,
)
from pagoda.backend.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = "PAGODA_ATTENTION_BACKEND"
ATTENTION_BACKENDS = ("torch", "triton")


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """The Triton backend on CUDA, the torch reference elsewhere; `PAGODA_ATTENTION_BACKEND`
    (torch or triton) forces either. Triton is imported only when its backend is chosen; on
    CUDA without triton installed, the default falls back to torch with a warning."""
    forced = os.environ.get(ATTENTION_BACKEND_ENV, "").strip().lower()
    if forced and forced not in ATTENTION_BACKENDS:
        raise ValueError(
            f"{ATTENTION_BACKEND_ENV} must be one of {ATTENTION_BACKENDS}, got {forced!r}"
        )
    choice = forced or ("triton" if device.type == "cuda" else "torch")
    if choice == "torch":
        return TorchAttentionBackend()
    if importlib.util.find_spec("triton") is None:
        if forced:
            raise ImportError(
                f"{ATTENTION_BACKEND_ENV}=triton needs triton: pip install 'pagoda[gpu]'"
            )
        logger.warning("triton is not installed; using the torch attention backend on %s", device)
        return TorchAttentionBackend()
    from pagoda.backend.attention.triton_backend import TritonAttentionBackend, require_runnable_on

    require_runnable_on(device)
    return TritonAttentionBackend()


__all__ = [
    "ATTENTION_BACKEND_ENV",
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "DecodeBatch",
    "TorchAttentionBackend",
    "get_attention_backend",
]
