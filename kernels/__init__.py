"""Compute kernels (the paged KV layout, mixture-of-experts, integer weights), each with a
pure-torch reference.

Only torch is imported here. The Triton versions live in `pagoda.kernels.triton`, which imports
triton; the attention backends import it only when the Triton backend is chosen.
"""

from pagoda.kernels.block_copy import copy_blocks_reference
from pagoda.kernels.fused_moe import fused_moe_reference
from pagoda.kernels.int_matmul import int_matmul_reference
from pagoda.kernels.kv_store import store_kv_reference
from pagoda.kernels.paged_attention import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)

__all__ = [
    "copy_blocks_reference",
    "fused_moe_reference",
    "int_matmul_reference",
    "paged_decode_attention_reference",
    "paged_prefill_attention_reference",
    "store_kv_reference",
]
