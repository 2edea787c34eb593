"""Moving small host lists to the device without stalling it.

A copy from pageable host memory to CUDA waits until the GPU has run everything queued before it:
one per step input would serialise the host and the GPU. Through pinned memory and a
non-blocking copy the host goes on at once (torch's pinned-memory cache keeps the buffer alive
until the copy ran).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return tensor
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
