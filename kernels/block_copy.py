"""Copying whole KV blocks, for copy-on-write of shared blocks (pure-torch reference)."""

from __future__ import annotations

import torch


def copy_blocks_reference(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]], sources: torch.Tensor, targets: torch.Tensor
) -> None:
    """For every layer, block targets[i] of K and V becomes a copy of block sources[i].

    All sources are read before any target is written, so a block freed and reused within one
    step (a target that was an earlier source) still receives the right contents.
    """
    for key_cache, value_cache in kv_caches:
        key_cache[targets] = key_cache[sources]
        value_cache[targets] = value_cache[sources]
