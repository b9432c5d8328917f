"""Plain torch scatter/gather: the definition the Triton kernels are tested against, and the CPU path.

Scatter is ``index_copy_`` of each (layer, component) slice of the staged blocks into the pool's pages,
which is also the baseline the benchmark compares the kernels with. Staged blocks come as the validated
``[n, components, layers, tokens, row_bytes]`` view of ``ops.staged_view``.
"""

from __future__ import annotations

import torch

from dualpath_kernel.pool import PagedKVPool


def scatter_reference(staged: torch.Tensor, pool: PagedKVPool, slots: torch.Tensor, pages: torch.Tensor,
                      first_layer: int) -> None:
    """Copy staged blocks ``slots`` into pool pages ``pages`` (validated by the caller)."""
    device_pages = pages.to(pool.device)
    for layer in range(staged.shape[2]):
        for component in range(pool.components):
            source = staged[:, component, layer].index_select(0, slots.to(staged.device)).to(pool.device)
            pool.page_rows(first_layer + layer, component).index_copy_(0, device_pages, source)


def gather_reference(pool: PagedKVPool, pages: torch.Tensor, staged: torch.Tensor, slots: torch.Tensor,
                     first_layer: int) -> None:
    """Copy pool pages ``pages`` into staged blocks ``slots`` (validated by the caller)."""
    device_pages = pages.to(pool.device)
    for layer in range(staged.shape[2]):
        for component in range(pool.components):
            rows = pool.page_rows(first_layer + layer, component).index_select(0, device_pages)
            staged[:, component, layer].index_copy_(0, slots.to(staged.device), rows.to(staged.device))
