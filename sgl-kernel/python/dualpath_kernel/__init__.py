"""KV copy kernels between DualPath Full Blocks and SGLang's paged KV pools (Triton, with a torch reference)."""

from __future__ import annotations

from dualpath_kernel.ops import Backend, CopyConfig, gather_blocks, resolve_backend, scatter_blocks, staged_view
from dualpath_kernel.pool import TORCH_DTYPES, PagedKVPool, block_range

__all__ = [
    "TORCH_DTYPES",
    "Backend",
    "CopyConfig",
    "PagedKVPool",
    "block_range",
    "gather_blocks",
    "resolve_backend",
    "scatter_blocks",
    "staged_view",
]
