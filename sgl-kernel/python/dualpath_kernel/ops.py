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


def staged_view(blocks: torch.Tensor, pool: PagedKVPool, first_layer: int = 0) -> torch.Tensor:
    """Validated ``[n, components, layers, tokens, row_bytes]`` view of staged blocks (no copy).

    ``blocks`` are Full Blocks ``[n, layers, tokens, bytes]`` (a token's component rows side by side) or already
    such a five-dimensional view, e.g. SGLang's ``layer_first`` host pages (all K planes, then all V planes)
    ``[n, planes, tokens, row_bytes]`` unflattened to ``[n, components, planes // components, tokens, row_bytes]``.
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8 or blocks.dim() not in (4, 5):
        described = f"{blocks.dtype} {tuple(blocks.shape)}" if isinstance(blocks, torch.Tensor) else type(blocks)
        raise ValueError(
            "blocks must be a uint8 tensor [n, layers, tokens, bytes] or [n, components, layers, tokens, "
            f"row_bytes], got {described}"
        )
    if blocks.dim() == 4:
        if blocks.shape[3] != pool.token_bytes:
            raise ValueError(f"blocks hold {blocks.shape[3]} bytes per token and layer, the pool {pool.token_bytes}")
        if blocks.stride(3) != 1 or blocks.stride(2) != pool.token_bytes:
            raise ValueError(f"each Layer Block must be contiguous [tokens, bytes]; strides are {blocks.stride()}")
        blocks = blocks.unflatten(3, (pool.components, pool.row_bytes)).permute(0, 3, 1, 2, 4)
    _, components, layers, tokens, row_bytes = blocks.shape
    if components != pool.components or row_bytes != pool.row_bytes:
        raise ValueError(f"blocks hold {components} components of {row_bytes} bytes per token, the pool "
                         f"{pool.components} of {pool.row_bytes}")
    if tokens != pool.page_size:
        raise ValueError(f"blocks hold {tokens} tokens but a pool page holds {pool.page_size}")
    if first_layer < 0 or first_layer + layers > pool.layers or layers == 0:
        raise ValueError(f"layers [{first_layer}, {first_layer + layers}) are not inside the pool's {pool.layers}")
    if blocks.stride(4) != 1:
        raise ValueError(f"each token's row must be contiguous; strides are {blocks.stride()}")
    if blocks.device != pool.device and not (
        blocks.device.type == "cpu" and pool.device.type == "cuda" and blocks.is_pinned()
    ):
        raise ValueError(f"blocks on {blocks.device} cannot reach a pool on {pool.device} (host memory must be pinned)")
    return blocks


def _check_indices(indices: PageIndices, count: int, limit: int, what: str, distinct: str) -> torch.Tensor:
    """Validated indices in ``[0, limit)`` as an int64 CPU tensor; ``distinct``: why they must not repeat (or "")."""
    host = torch.as_tensor(indices).cpu()
    if host.dim() != 1 or host.numel() != count:
        raise ValueError(f"expected {count} {what} indices (one per copy), got shape {tuple(host.shape)}")
    if host.is_floating_point() or host.is_complex() or host.dtype == torch.bool:
        raise ValueError(f"{what} indices must be integers, got {host.dtype}")
    host = host.to(torch.int64)
    outside = ((host < 0) | (host >= limit)).nonzero()
    if outside.numel():
        position = int(outside[0])
        kind = "the pool's pages" if what == "page" else "the staged blocks"
        raise ValueError(f"{what} index {int(host[position])} at position {position} is outside {kind} [0, {limit})")
    if distinct:
        values, counts = host.unique(return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"{what}s {values[counts > 1].tolist()} are targeted more than once; {distinct}")
    return host


def _copies(staged: torch.Tensor, pool: PagedKVPool, pages: PageIndices, slots: PageIndices | None,
            to_pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slots, pages)`` of each copy, validated, on the pool's device: staged block ``slots[i]`` <-> ``pages[i]``."""
    count = staged.shape[0] if slots is None else torch.as_tensor(slots).numel()
    races = "the copies would race"
    page_tensor = _check_indices(pages, count, pool.pages, "page", races if to_pool else "")
    slot_tensor = (torch.arange(count) if slots is None
                   else _check_indices(slots, count, staged.shape[0], "slot", "" if to_pool else races))
    return slot_tensor.to(pool.device), page_tensor.to(pool.device)


def scatter_blocks(
    blocks: torch.Tensor,
    pool: PagedKVPool,
    pages: PageIndices,
    *,
    slots: PageIndices | None = None,
    first_layer: int = 0,
    backend: Backend = "auto",
    config: CopyConfig = DEFAULT_CONFIG,
) -> None:
    """Copy staged block ``slots[i]`` (default ``i``) into pool page ``pages[i]``, every staged layer and component."""
    staged = staged_view(blocks, pool, first_layer)
    slot_tensor, page_tensor = _copies(staged, pool, pages, slots, to_pool=True)
    if resolve_backend(backend, pool.device) == "torch":
        scatter_reference(staged, pool, slot_tensor, page_tensor, first_layer)
    else:
        triton_copy.copy_pages(staged, pool, slot_tensor, page_tensor, first_layer, True, *config)


def gather_blocks(
    pool: PagedKVPool,
    pages: PageIndices,
    blocks: torch.Tensor,
    *,
    slots: PageIndices | None = None,
    first_layer: int = 0,
    backend: Backend = "auto",
    config: CopyConfig = DEFAULT_CONFIG,
) -> None:
    """Copy pool page ``pages[i]`` (pages may repeat) into staged block ``slots[i]`` (default ``i``), every staged
    layer and component."""
    staged = staged_view(blocks, pool, first_layer)
    slot_tensor, page_tensor = _copies(staged, pool, pages, slots, to_pool=False)
    if resolve_backend(backend, pool.device) == "torch":
        gather_reference(pool, page_tensor, staged, slot_tensor, first_layer)
    else:
        triton_copy.copy_pages(staged, pool, slot_tensor, page_tensor, first_layer, False, *config)
