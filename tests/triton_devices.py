"""Where this test process can run Triton kernels: on CPU under the interpreter (the default
suite; conftest.py turns it on without CUDA) or on CUDA compiled (gpu marker). Triton makes that
choice once per process, so each test skips the device the process cannot serve."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def require(device: str) -> torch.device:
    from pagoda.kernels.triton import interpreting

    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        if interpreting():
            pytest.skip("TRITON_INTERPRET=1: the CUDA cases test compiled kernels")
    elif not interpreting():
        if torch.cuda.is_available():
            pytest.skip("kernels are compiled in this process; CPU cases need TRITON_INTERPRET=1")
        pytest.fail("triton was imported before conftest.py set TRITON_INTERPRET=1")
    return torch.device(device)
