"""Scatter staged Full/Layer Blocks into SGLang's paged KV pool and gather them back.

Staged blocks are a uint8 tensor ``[n, layers, tokens, bytes_per_token_per_layer]`` (the Full Block
layout of ``dualpath.kv``; ``block_range`` views a ``BlockBuffer`` this way). Block ``i`` maps to pool
page ``pages[i]``, and the block's layer axis covers pool layers ``first_layer ..``: a Full Block range
passes every layer, a Layer Block passes ``blocks[:, l : l + 1]`` with ``first_layer=l``. Blocks may live
in device memory or in pinned host memory, which the kernel reads (or writes) over PCIe directly.

Every argument is checked before anything is launched, so a rejected call leaves the pool untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

from dualpath_kernel.pool import PagedKVPool
from dualpath_kernel.reference import gather_reference, scatter_reference

try:
    from dualpath_kernel import triton_copy
except ImportError:  # triton is optional: without it every call takes the torch path
    triton_copy = None  # type: ignore[assignment]

Backend = Literal["auto", "triton", "torch"]
PageIndices = torch.Tensor | np.ndarray | Sequence[int]


class CopyConfig(NamedTuple):
    """Triton launch shape: bytes one program moves per loop step, and warps per program."""

    tile_bytes: int = 16384
    num_warps: int = 4


DEFAULT_CONFIG = CopyConfig()


def resolve_backend(backend: Backend, device: torch.device) -> Literal["triton", "torch"]:
    """``auto`` picks Triton wherever it can run (CUDA, or CPU under ``TRITON_INTERPRET=1``), else torch."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch"
    if triton_copy is not None and triton_copy.runs_on(device):
        return "triton"
    if backend == "triton":
        reason = "triton is not installed" if triton_copy is None else "set TRITON_INTERPRET=1 before import"
        raise ValueError(f"the Triton backend cannot run for a pool on {device}: {reason}")
    return "torch"


def _check_blocks(blocks: torch.Tensor, pool: PagedKVPool, first_layer: int) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() != 4:
        described = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks)
        raise ValueError(f"blocks must be a uint8 tensor [n, layers, tokens, bytes], got {described}")
    _, layers, tokens, token_bytes = blocks.shape
    if tokens != pool.page_size:
        raise ValueError(f"blocks hold {tokens} tokens but a pool page holds {pool.page_size}")
    if token_bytes != pool.token_bytes:
        raise ValueError(f"blocks hold {token_bytes} bytes per token and layer, the pool {pool.token_bytes}")
    if first_layer < 0 or first_layer + layers > pool.layers or layers == 0:
        raise ValueError(f"layers [{first_layer}, {first_layer + layers}) are not inside the pool's {pool.layers}")
    if blocks.stride(3) != 1 or blocks.stride(2) != token_bytes:
        raise ValueError(f"each Layer Block must be contiguous [tokens, bytes]; strides are {blocks.stride()}")
    if blocks.device != pool.device and not (
        blocks.device.type == "cpu" and pool.device.type == "cuda" and blocks.is_pinned()
    ):
        raise ValueError(f"blocks on {blocks.device} cannot reach a pool on {pool.device} (host memory must be pinned)")


def _check_pages(pages: PageIndices, count: int, pool: PagedKVPool, distinct: bool) -> torch.Tensor:
    """Validated page indices as an int64 tensor on the pool's device."""
    host = torch.as_tensor(pages).cpu()
    if host.dim() != 1 or host.numel() != count:
        raise ValueError(f"expected {count} page indices (one per block), got shape {tuple(host.shape)}")
    if host.is_floating_point() or host.is_complex() or host.dtype == torch.bool:
        raise ValueError(f"page indices must be integers, got {host.dtype}")
    host = host.to(torch.int64)
    outside = ((host < 0) | (host >= pool.pages)).nonzero()
    if outside.numel():
        position = int(outside[0])
        raise ValueError(
            f"page index {int(host[position])} at position {position} is outside the pool's pages [0, {pool.pages})"
        )
    if distinct:
        values, counts = host.unique(return_counts=True)
        if (counts > 1).any():
            repeated = values[counts > 1].tolist()
            raise ValueError(f"pages {repeated} are targeted more than once; a scatter needs distinct pages")
    return host.to(pool.device)


def scatter_blocks(
    blocks: torch.Tensor,
    pool: PagedKVPool,
    pages: PageIndices,
    *,
    first_layer: int = 0,
    backend: Backend = "auto",
    config: CopyConfig = DEFAULT_CONFIG,
) -> None:
    """Copy staged block ``i`` into pool page ``pages[i]``, for every staged layer and component."""
    _check_blocks(blocks, pool, first_layer)
    page_tensor = _check_pages(pages, blocks.shape[0], pool, distinct=True)
    if resolve_backend(backend, pool.device) == "torch":
        scatter_reference(blocks, pool, page_tensor, first_layer)
    else:
        triton_copy.copy_pages(blocks, pool, page_tensor, first_layer, True, *config)


def gather_blocks(
    pool: PagedKVPool,
    pages: PageIndices,
    blocks: torch.Tensor,
    *,
    first_layer: int = 0,
    backend: Backend = "auto",
    config: CopyConfig = DEFAULT_CONFIG,
) -> None:
    """Copy pool page ``pages[i]`` into staged block ``i`` (pages may repeat), for every staged layer."""
    _check_blocks(blocks, pool, first_layer)
    page_tensor = _check_pages(pages, blocks.shape[0], pool, distinct=False)
    if resolve_backend(backend, pool.device) == "torch":
        gather_reference(pool, page_tensor, blocks, first_layer)
    else:
        triton_copy.copy_pages(blocks, pool, page_tensor, first_layer, False, *config)
