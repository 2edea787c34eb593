"""Attention backends behind one interface; `get_attention_backend` picks one for a device."""

from __future__ import annotations

from pagoda.backend.attention.base import AttentionBackend, AttentionMetadata, BatchLayout
from pagoda.backend.attention.torch_backend import TorchAttentionBackend


def get_attention_backend() -> AttentionBackend:
    """The torch reference runs everywhere; the Triton backend (GPU path) will plug in here."""
    return TorchAttentionBackend()


__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "BatchLayout",
    "TorchAttentionBackend",
    "get_attention_backend",
]
