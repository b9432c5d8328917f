"""Plain torch scatter/gather: the definition the Triton kernels are tested against, and the CPU path.

Scatter is ``index_copy_`` of each (layer, component) slice of the staged blocks into the pool's pages,
which is also the baseline the benchmark compares the kernels with.
"""

from __future__ import annotations

import torch

from dualpath_kernel.pool import PagedKVPool


def _component_slice(blocks: torch.Tensor, layer: int, component: int, row_bytes: int) -> torch.Tensor:
    """``[blocks, tokens, row_bytes]`` view of one component of one staged layer."""
    return blocks[:, layer, :, component * row_bytes : (component + 1) * row_bytes]


def scatter_reference(blocks: torch.Tensor, pool: PagedKVPool, pages: torch.Tensor, first_layer: int) -> None:
    """Copy staged blocks ``[n, layers, tokens, bytes]`` into pool pages ``pages`` (validated by the caller)."""
    device_pages = pages.to(pool.device)
    for layer in range(blocks.shape[1]):
        for component in range(pool.components):
            source = _component_slice(blocks, layer, component, pool.row_bytes).to(pool.device)
            pool.page_rows(first_layer + layer, component).index_copy_(0, device_pages, source)


def gather_reference(pool: PagedKVPool, pages: torch.Tensor, blocks: torch.Tensor, first_layer: int) -> None:
    """Copy pool pages ``pages`` into staged blocks ``[n, layers, tokens, bytes]`` (validated by the caller)."""
    device_pages = pages.to(pool.device)
    for layer in range(blocks.shape[1]):
        for component in range(pool.components):
            rows = pool.page_rows(first_layer + layer, component).index_select(0, device_pages)
            _component_slice(blocks, layer, component, pool.row_bytes).copy_(rows)
