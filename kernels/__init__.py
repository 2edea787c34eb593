"""Compute kernels on the paged KV layout, each with a pure-torch reference.

Only torch is imported here; Triton kernels (GPU) are imported lazily by their dispatchers.
"""

from pagoda.kernels.block_copy import copy_blocks_reference
from pagoda.kernels.kv_store import store_kv_reference

__all__ = ["copy_blocks_reference", "store_kv_reference"]
