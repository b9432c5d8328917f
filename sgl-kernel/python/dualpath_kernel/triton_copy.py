"""One Triton kernel that moves pages between staged Full Blocks and the paged pool, either way.

Each program copies a tile of tokens of one (block, layer, component): on the staging side that is a
strided ``[tokens, row]`` slice of a staged block (in a Full Block K rows sit next to V rows, in an SGLang
``layer_first`` page they are planes apart), on the pool side ``page_size`` consecutive slots of one
buffer. Each copy names its staged block and its pool page, so one launch places any set of blocks of a
staging region. Bytes move as the widest integer word every stride and address allows, with alignment
hints so loads and stores become 16-byte vectors; nothing is converted, so bf16, fp16, fp8 and packed
caches are all the same copy.

Under ``TRITON_INTERPRET=1`` (read by Triton when this module is imported) the same kernel runs on CPU
tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dualpath_kernel.pool import PagedKVPool, power_of_two_dividing

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Tiles narrower than this waste most of a memory transaction; mask a wider tile instead.
_MIN_TILE_ROW_BYTES = 128


@triton.jit
def _copy_pages_kernel(
    staged_ptr,  # staged blocks as words: row (block, component, layer, token) at the strides below
    slots_ptr,  # int64 staged block of each copy
    pool_table_ptr,  # int64 address of pool buffer [layer][component]
    pages_ptr,  # int64 pool page of each copy
    first_layer,
    layers,
    block_stride,
    component_stride,
    layer_stride,
    token_stride,
    page_size,
    row_words,
    COMPONENTS: tl.constexpr,
    ADDRESS_ALIGN: tl.constexpr,  # bytes every pool buffer address is a multiple of
    VEC: tl.constexpr,  # words every row offset is a multiple of
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN: tl.constexpr,  # tiles divide the page and the row exactly: no masks
    TO_POOL: tl.constexpr,
):
    # Same value (row_words is a multiple of VEC), but written so the compiler sees it and keeps the
    # masked tail's accesses VEC words wide.
    row_words = row_words // VEC * VEC
    program = tl.program_id(0)
    component = program % COMPONENTS
    layer = (program // COMPONENTS) % layers
    copy = (program // (COMPONENTS * layers)).to(tl.int64)
    page = tl.load(pages_ptr + copy)
    block = tl.load(slots_ptr + copy)
    address = tl.load(pool_table_ptr + (first_layer + layer) * COMPONENTS + component)
    pool_ptr = tl.multiple_of(address.to(tl.pointer_type(staged_ptr.dtype.element_ty)), ADDRESS_ALIGN)

    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    staged_rows = block * block_stride + component * component_stride + layer * layer_stride + tokens * token_stride
    pool_rows = (page * page_size + tokens) * row_words
    staged_rows = tl.multiple_of(staged_rows, VEC)
    pool_rows = tl.multiple_of(pool_rows, VEC)
    for start in range(0, row_words, BLOCK_C):
        columns = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK_C), BLOCK_C), BLOCK_C)
        staged = staged_ptr + staged_rows[:, None] + columns[None, :]
        pooled = pool_ptr + pool_rows[:, None] + columns[None, :]
        if TO_POOL:
            source, target = staged, pooled
        else:
            source, target = pooled, staged
        if EVEN:
            tl.store(target, tl.load(source, eviction_policy="evict_first"))
        else:
            mask = (tokens < page_size)[:, None] & (columns < row_words)[None, :]
            tl.store(target, tl.load(source, mask=mask, eviction_policy="evict_first"), mask=mask)


def runs_on(device: torch.device) -> bool:
    """Whether the kernel can run for a pool on ``device``: compiled on CUDA, interpreted on CPU."""
    return device.type == "cuda" or isinstance(_copy_pages_kernel, InterpretedFunction)


def _tile(row_words: int, page_size: int, word: int, tile_bytes: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_C)``: columns that divide the row when that keeps tiles wide, tokens to fill the tile."""
    tile_words = max(1, tile_bytes // word)
    columns = min(row_words & -row_words, tile_words)
    if columns * word < _MIN_TILE_ROW_BYTES:
        columns = min(triton.next_power_of_2(row_words), tile_words)
    tokens = min(triton.next_power_of_2(page_size), max(1, tile_words // columns))
    return tokens, columns


class Launch(NamedTuple):
    """Everything one kernel launch takes, worked out from validated arguments."""

    grid: tuple[int, int]
    args: tuple[object, ...]
    constants: dict[str, int | bool]
    num_warps: int


def plan_copy(
    staged: torch.Tensor,
    pool: PagedKVPool,
    slots: torch.Tensor,
    pages: torch.Tensor,
    first_layer: int,
    to_pool: bool,
    tile_bytes: int,
    num_warps: int,
) -> Launch:
    """Word size, vector hints and tile shape for copying staged blocks ``slots`` to or from pool ``pages``.

    ``staged`` is ``[n, components, layers, tokens, row_bytes]`` uint8 with contiguous rows (``ops.staged_view``).
    """
    row_bytes = pool.row_bytes
    strides = [staged.stride(dim) for dim in range(4)]
    alignment = power_of_two_dividing(row_bytes, *strides, staged.data_ptr(), pool.address_alignment)
    word = min(alignment, 8)
    row_words = row_bytes // word
    block_t, block_c = _tile(row_words, pool.page_size, word, tile_bytes)
    layers = staged.shape[2]
    block_stride, component_stride, layer_stride, token_stride = (stride // word for stride in strides)
    args = (
        staged.view(_WORD_DTYPES[word]),
        slots,
        pool.address_table,
        pages,
        first_layer,
        layers,
        block_stride,
        component_stride,
        layer_stride,
        token_stride,
        pool.page_size,
        row_words,
    )
    constants = {
        "COMPONENTS": pool.components,
        "ADDRESS_ALIGN": alignment,
        "VEC": alignment // word,
        "BLOCK_T": block_t,
        "BLOCK_C": block_c,
        "EVEN": row_words % block_c == 0 and pool.page_size % block_t == 0,
        "TO_POOL": to_pool,
    }
    grid = (pages.numel() * layers * pool.components, triton.cdiv(pool.page_size, block_t))
    return Launch(grid, args, constants, num_warps)


def copy_pages(
    staged: torch.Tensor,
    pool: PagedKVPool,
    slots: torch.Tensor,
    pages: torch.Tensor,
    first_layer: int,
    to_pool: bool,
    tile_bytes: int,
    num_warps: int,
) -> None:
    """Launch the kernel on validated arguments (see ``dualpath_kernel.ops``)."""
    launch = plan_copy(staged, pool, slots, pages, first_layer, to_pool, tile_bytes, num_warps)
    with torch.cuda.device(pool.device) if pool.device.type == "cuda" else nullcontext():
        _copy_pages_kernel[launch.grid](*launch.args, **launch.constants, num_warps=launch.num_warps)
