"""Triton versions of the kernels in `pagoda.kernels`; importing this package imports triton.

Kernels run compiled on CUDA tensors, or on CPU tensors when the process runs Triton's
interpreter (`TRITON_INTERPRET=1` set before triton is first imported); see `launch`.
"""

from pagoda.kernels.triton.block_copy import copies_overlap, copy_blocks_triton
from pagoda.kernels.triton.decode_attention import paged_decode_attention_triton
from pagoda.kernels.triton.fused_moe import fused_moe_triton, sort_by_expert
from pagoda.kernels.triton.int_matmul import int_matmul_triton
from pagoda.kernels.triton.kv_store import store_kv_triton
from pagoda.kernels.triton.launch import interpreting
from pagoda.kernels.triton.prefill_attention import (
    PrefillTiles,
    paged_prefill_attention_triton,
    tokens_per_tile,
)

__all__ = [
    "PrefillTiles",
    "copies_overlap",
    "copy_blocks_triton",
    "fused_moe_triton",
    "int_matmul_triton",
    "interpreting",
    "paged_decode_attention_triton",
    "paged_prefill_attention_triton",
    "sort_by_expert",
    "store_kv_triton",
    "tokens_per_tile",
]
