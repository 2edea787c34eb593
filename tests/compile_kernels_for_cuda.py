"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

Runs each kernel's wrapper on small CPU tensors in a process where kernels are compiled (no
TRITON_INTERPRET); instead of launching, every launch goes through Triton's own argument binding
and specialization for a target GPU and is compiled down to a cubin with the ptxas bundled in the
triton wheel. This checks what the interpreter cannot: that the kernels are valid compiled Triton
(types of loop-carried values, constexpr use, tl.dot shapes and operand types) for the float16,
bfloat16 and float32 variants, on Ampere (sm_80) and Hopper (sm_90). It does not run them.

    python tests/compile_kernels_for_cuda.py   (test_kernels.py runs it)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

compiled: set[str] = set()


def compile_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: the binding and specialization a launch would do on the
    target, then triton.compile, as JITFunction.run and _do_compile do (triton 3.7)."""
    kwargs["debug"] = kwargs.get("debug", self.debug)
    for target in TARGETS:
        backend = make_backend(target)
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound_args, specialization, options
        )
        source = ASTSource(self, signature, constexprs, attrs)
        name = f"{self.fn.__name__}@sm_{target.arch}/{source.hash()[:8]}"
        if name not in compiled:
            kernel = triton.compile(source, target=target, options=options.__dict__)
            assert kernel.asm["cubin"], name
            compiled.add(name)


def run_every_wrapper(dtype: torch.dtype) -> None:
    from pagoda.kernels.triton import (
        PrefillTiles,
        copy_blocks_triton,
        paged_decode_attention_triton,
        paged_prefill_attention_triton,
        store_kv_triton,
        tokens_per_tile,
    )

    num_heads, num_kv_heads, head_dim, block_size = 32, 8, 128, 16
    cache = torch.zeros(64, block_size, num_kv_heads, head_dim, dtype=dtype)
    tokens = torch.zeros(40, 3, num_kv_heads, head_dim, dtype=dtype)  # strided like a fused qkv
    store_kv_triton(tokens[:, 1], tokens[:, 2], cache, cache, torch.arange(40))
    copy_blocks_triton([(cache, cache)], torch.tensor([1]), torch.tensor([2]))
    query = torch.zeros(40, num_heads, head_dim, dtype=dtype)
    tables = torch.zeros(4, 32, dtype=torch.int32)
    lens = torch.full((4,), 10, dtype=torch.int32)
    for max_seq_len, window in ((100, None), (4096, None), (4096, 1024)):  # split-K: 8 partitions
        paged_decode_attention_triton(
            query[:4], cache, cache, tables, lens, 0.1, max_seq_len, window
        )
    starts = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)
    tiles = PrefillTiles.build([0, 1], [10] * 4, tokens_per_tile(num_heads, num_kv_heads), "cpu")
    for window in (None, 1024):
        paged_prefill_attention_triton(
            query, cache, cache, tables, starts, lens, 0.1, tiles, 4096, window
        )


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels instead of interpreting them")
    started = time.monotonic()
    JITFunction.run = compile_instead_of_launch
    for dtype in DTYPES:
        run_every_wrapper(dtype)
    print(f"compiled {len(compiled)} kernel variants in {time.monotonic() - started:.1f} s")
    for name in sorted(compiled):
        print(" ", name)


if __name__ == "__main__":
    main()
