"""Compile every Triton kernel for NVIDIA GPUs on a machine without one.

Runs each kernel's wrapper on small CPU tensors in a process where kernels are compiled (no
TRITON_INTERPRET); instead of launching, every launch goes through Triton's own argument binding
and specialization for a target GPU and is compiled down to a cubin with the ptxas bundled in the
triton wheel. This checks what the interpreter cannot: that the kernels are valid compiled Triton
(types of loop-carried values, constexpr use, tl.dot shapes and operand types) for the float16,
bfloat16 and float32 variants of two head layouts (bfloat16 also with attention soft-capping)
and of the fused-MoE kernels, on Ampere (sm_80) and Hopper (sm_90). It does not run them.

    python tests/compile_kernels_for_cuda.py   (test_kernels.py runs it)

With --count-variants it compiles nothing: it drives the Triton attention backend through steps
of twelve different maximum sequence lengths and prints, per kernel, how many variants Triton
would compile (each distinct specialization is a fresh compile on the GPU).
"""

from __future__ import annotations

import json
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
# (num_heads, num_kv_heads, head_dim): GQA as Llama 3 8B; MHA with a head_dim that is not a power
# of two (masked) and rows wider than one store program (two chunks).
HEAD_SHAPES = [(32, 8, 128), (16, 16, 80)]

compiled: set[str] = set()
# Kernel name -> the variant keys launches asked for (--count-variants).
variants: dict[str, set[str]] = {}


def bind(self: JITFunction, args: tuple, kwargs: dict, target: GPUTarget) -> tuple[ASTSource, dict]:
    """The binding and specialization a launch would do on the target, as JITFunction.run and
    _do_compile do (triton 3.7): the source to compile (its hash names the variant, as Triton's
    own kernel cache does) and the compile options."""
    kwargs["debug"] = kwargs.get("debug", self.debug)
    backend = make_backend(target)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return ASTSource(self, signature, constexprs, attrs), options.__dict__


def compile_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: binds the launch for each target GPU and compiles it."""
    for target in TARGETS:
        source, options = bind(self, args, dict(kwargs), target)
        name = f"{self.fn.__name__}@sm_{target.arch}/{source.hash()[:8]}"
        if name not in compiled:
            kernel = triton.compile(source, target=target, options=options)
            assert kernel.asm["cubin"], name
            compiled.add(name)


def record_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: records which variant the launch would compile (sm_90)."""
    source, _ = bind(self, args, dict(kwargs), TARGETS[-1])
    variants.setdefault(self.fn.__name__, set()).add(source.hash())


def run_every_wrapper(dtype: torch.dtype, heads: tuple[int, int, int]) -> None:
    from pagoda.kernels.triton import (
        PrefillTiles,
        copy_blocks_triton,
        paged_decode_attention_triton,
        paged_prefill_attention_triton,
        store_kv_triton,
        tokens_per_tile,
    )

    num_heads, num_kv_heads, head_dim = heads
    block_size = 16
    cache = torch.zeros(64, block_size, num_kv_heads, head_dim, dtype=dtype)
    tokens = torch.zeros(40, 3, num_kv_heads, head_dim, dtype=dtype)  # strided like a fused qkv
    store_kv_triton(tokens[:, 1], tokens[:, 2], cache, cache, torch.arange(40))
    copy_blocks_triton([(cache, cache)], torch.tensor([1]), torch.tensor([2]))
    query = torch.zeros(40, num_heads, head_dim, dtype=dtype)
    tables = torch.zeros(4, 32, dtype=torch.int32)
    lens = torch.full((4,), 10, dtype=torch.int32)
    # Gemma 2's attention logit soft-capping in the dtype it is served in only: the capped
    # scores are float32 whatever the cache holds, and every variant costs seconds to compile.
    soft_caps = (None, 50.0) if dtype == torch.bfloat16 else (None,)
    # split-K from 4096 on: 8 partitions.
    decodes = [(100, None, None), (4096, None, None)]
    decodes += [(4096, 1024, soft_cap) for soft_cap in soft_caps]
    for max_seq_len, window, soft_cap in decodes:
        paged_decode_attention_triton(
            query[:4], cache, cache, tables, lens, 0.1, max_seq_len, window, soft_cap=soft_cap
        )
    starts = torch.tensor([0, 10, 20, 30, 40], dtype=torch.int32)
    tiles = PrefillTiles.build([0, 1], [10] * 4, tokens_per_tile(num_heads, num_kv_heads), "cpu")
    for window, soft_cap in [(None, None), *((1024, soft_cap) for soft_cap in soft_caps)]:
        paged_prefill_attention_triton(
            query, cache, cache, tables, starts, lens, 0.1, tiles, window, soft_cap=soft_cap
        )


def run_moe_wrapper(dtype: torch.dtype) -> None:
    """The fused-MoE kernels at both block sizes: a decode-sized step (few tokens over many
    experts) and a prefill-sized one, with sizes that are not powers of two."""
    from pagoda.kernels.triton import fused_moe_triton

    num_experts, top_k, hidden_size, intermediate_size = 64, 6, 2048 + 64, 768 + 16
    gate_up = torch.zeros(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
    down = torch.zeros(num_experts, hidden_size, intermediate_size, dtype=dtype)
    for num_tokens in (4, 300):
        hidden = torch.zeros(num_tokens, hidden_size, dtype=dtype)
        topk_weights, topk_ids = torch.rand(num_tokens, num_experts).topk(top_k)
        fused_moe_triton(hidden, gate_up, down, topk_weights, topk_ids)


def run_backend_steps(max_seq_lens: list[int]) -> None:
    """One Triton-backend step per length: decodes up to that length (one exactly), a prefill
    chunk ending there and a whole short prompt, so every kernel sees each maximum."""
    from pagoda.backend.attention import BatchLayout
    from pagoda.backend.attention import triton_backend

    # Launches are recorded, not run: CPU tensors stand in for CUDA ones.
    triton_backend.interpreting = lambda: True
    backend = triton_backend.TritonAttentionBackend()
    num_heads, num_kv_heads, head_dim, block_size = 32, 8, 128, 16
    cache = torch.zeros(4, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16)
    for step, max_seq_len in enumerate(max_seq_lens):
        pieces = [(max_seq_len - 1, 1), (max_seq_len // 2, 1), (7, 1), (max_seq_len - 20, 20),
                  (0, 3 + step)]
        starts = [0]
        for _, new in pieces:
            starts.append(starts[-1] + new)
        layout = BatchLayout(
            query_start_loc=starts, context_lens=[context for context, _ in pieces],
            block_tables=[[0] * -(-(context + new) // block_size) for context, new in pieces],
            slot_mapping=torch.zeros(starts[-1], dtype=torch.long), block_size=block_size,
        )
        query = torch.zeros(starts[-1], num_heads, head_dim, dtype=torch.bfloat16)
        key = torch.zeros(starts[-1], num_kv_heads, head_dim, dtype=torch.bfloat16)
        metadata = backend.prepare(layout, torch.device("cpu"))
        backend.forward(query, key, key, cache, cache, metadata, 0.1)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels instead of interpreting them")
    if sys.argv[1:] == ["--count-variants"]:
        # Twelve maximum lengths between 100 and 5,000 tokens, as a serving run sees them.
        JITFunction.run = record_instead_of_launch
        run_backend_steps([100, 137, 250, 511, 512, 513, 1000, 1500, 2049, 3000, 4097, 5000])
        print(json.dumps({name: len(keys) for name, keys in sorted(variants.items())}))
        return
    started = time.monotonic()
    JITFunction.run = compile_instead_of_launch
    for dtype in DTYPES:
        for heads in HEAD_SHAPES:
            run_every_wrapper(dtype, heads)
        run_moe_wrapper(dtype)
    print(f"compiled {len(compiled)} kernel variants in {time.monotonic() - started:.1f} s")
    for name in sorted(compiled):
        print(" ", name)


if __name__ == "__main__":
    main()
