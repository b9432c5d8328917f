"""Layer Block grids: where every Layer Block of a registered region lives, and batched descriptors.

A grid is one registered region holding ``slots`` blocks of ``layers`` Layer Blocks each, with the Layer
Block of (slot, layer) at ``base + slot * slot_stride + layer * layer_stride``. That one affine rule covers
the Full Block buffers of the store (``slot_stride`` = page-rounded Full Block, ``layer_stride`` = Layer
Block) and layer-major pools such as SGLang's per-layer KV buffers (``slot_stride`` = Layer Block,
``layer_stride`` = a whole layer), in host DRAM or GPU memory. Peers exchange grids, never addresses.
"""

from __future__ import annotations

import sys
from typing import Literal

import msgspec
import numpy as np

from dualpath.kv import BlockBuffer, BlockLayout
from dualpath.kv.layout import address, as_bytes

MemKind = Literal["DRAM", "VRAM"]


class LayerBlockGrid(msgspec.Struct, frozen=True):
    """Affine map from (slot, layer) to the address of a Layer Block inside one registered region."""

    name: str
    base: int
    slots: int
    layers: int
    slot_stride: int
    layer_stride: int
    block_tokens: int
    bytes_per_token: int
    mem: MemKind = "DRAM"
    device: int = 0

    def __post_init__(self) -> None:
        for field in ("base", "slots", "layers", "block_tokens", "bytes_per_token"):
            if getattr(self, field) <= 0:
                raise ValueError(f"grid {self.name!r}: {field} must be positive, got {getattr(self, field)}")
        if self.mem not in ("DRAM", "VRAM"):
            raise ValueError(f"grid {self.name!r}: mem must be 'DRAM' or 'VRAM', got {self.mem!r}")
        lbb = self.layer_block_bytes
        if self.slot_stride < lbb or self.layer_stride < lbb:
            raise ValueError(f"grid {self.name!r}: strides must be at least one Layer Block ({lbb} bytes)")

    @property
    def layer_block_bytes(self) -> int:
        return self.block_tokens * self.bytes_per_token

    @property
    def extent(self) -> int:
        """Bytes from ``base`` to the end of the last Layer Block: the region to register."""
        return (self.slots - 1) * self.slot_stride + (self.layers - 1) * self.layer_stride + self.layer_block_bytes

    def check_slots(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.ndim != 1 or slots.size == 0:
            raise ValueError(f"grid {self.name!r}: slots must be a non-empty 1-D list")
        if slots.min() < 0 or slots.max() >= self.slots:
            raise ValueError(f"grid {self.name!r}: slot out of range [0, {self.slots}): {slots.tolist()}")
        return slots

    def all_layer_blocks(self) -> np.ndarray:
        """``(slots * layers) x 3`` descriptors, row ``slot * layers + layer``: prepared once per peer."""
        slot_part = np.arange(self.slots, dtype=np.int64)[:, None] * self.slot_stride
        layer_part = np.arange(self.layers, dtype=np.int64)[None, :] * self.layer_stride
        starts = (self.base + slot_part + layer_part).reshape(-1)
        return _descs(starts, np.full(starts.size, self.layer_block_bytes, dtype=np.int64), self.device)

    def layer_indices(self, slots: np.ndarray, layer: int) -> np.ndarray:
        """Rows of :meth:`all_layer_blocks` holding ``layer`` of ``slots`` (int32, as NIXL wants)."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"grid {self.name!r}: layer {layer} out of range [0, {self.layers})")
        return (slots * self.layers + layer).astype(np.int32)

    def token_segments(self, slots: np.ndarray, layer: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Start addresses and lengths of tokens ``[start, end)`` of one layer; token t is in block t // tokens."""
        first, last = start // self.block_tokens, (end - 1) // self.block_tokens
        blocks = np.arange(first, last + 1)
        starts = self.base + slots[blocks] * self.slot_stride + layer * self.layer_stride
        lo = np.zeros(blocks.size, dtype=np.int64)
        hi = np.full(blocks.size, self.block_tokens, dtype=np.int64)
        lo[0] = start - first * self.block_tokens
        hi[-1] = end - last * self.block_tokens
        return starts + lo * self.bytes_per_token, (hi - lo) * self.bytes_per_token


def _descs(starts: np.ndarray, lengths: np.ndarray, device: int) -> np.ndarray:
    out = np.empty((starts.size, 3), dtype=np.uint64)
    out[:, 0], out[:, 1], out[:, 2] = starts, lengths, device
    return out


def merged_pair_descs(
    src_starts: np.ndarray, dst_starts: np.ndarray, lengths: np.ndarray, src_device: int, dst_device: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nx3 source and destination descriptors with runs that are contiguous on both sides merged."""
    if src_starts.size == 0:
        raise ValueError("no bytes to transfer")
    ends_src, ends_dst = src_starts + lengths, dst_starts + lengths
    # A segment opens a new run unless it starts exactly where the previous one ended, on both sides.
    opens = np.ones(src_starts.size, dtype=bool)
    opens[1:] = (src_starts[1:] != ends_src[:-1]) | (dst_starts[1:] != ends_dst[:-1])
    run = np.cumsum(opens) - 1
    run_lengths = np.bincount(run, weights=lengths).astype(np.int64)
    return _descs(src_starts[opens], run_lengths, src_device), _descs(dst_starts[opens], run_lengths, dst_device)


def grid_for_buffer(name: str, buffer: BlockBuffer) -> LayerBlockGrid:
    """The grid of a store :class:`BlockBuffer` (Full Blocks, one per slot)."""
    layout = buffer.layout
    return LayerBlockGrid(
        name=name,
        base=address(buffer.region),
        slots=buffer.capacity,
        layers=layout.geometry.layers,
        slot_stride=buffer.stride,
        layer_stride=layout.layer_block_bytes,
        block_tokens=layout.block_tokens,
        bytes_per_token=layout.geometry.bytes_per_token_per_layer,
    )


def grid_for_layer_major(name: str, memory: object, layout: BlockLayout, slots: int) -> LayerBlockGrid:
    """The grid of a layer-major pool ``[layers, slots, tokens, bytes]`` in a host array or CUDA tensor."""
    lbb = layout.layer_block_bytes
    base, nbytes, mem, device = region_of(memory)
    if nbytes < layout.geometry.layers * slots * lbb:
        raise ValueError(f"memory of {nbytes} bytes cannot hold {slots} slots of layout {layout.shape}")
    return LayerBlockGrid(
        name=name,
        base=base,
        slots=slots,
        layers=layout.geometry.layers,
        slot_stride=lbb,
        layer_stride=slots * lbb,
        block_tokens=layout.block_tokens,
        bytes_per_token=layout.geometry.bytes_per_token_per_layer,
        mem=mem,
        device=device,
    )


def region_of(memory: object) -> tuple[int, int, MemKind, int]:
    """(address, bytes, kind, device) of a C-contiguous host array or torch tensor (CPU or CUDA)."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(memory, torch.Tensor):
        if not memory.is_contiguous():
            raise ValueError("tensor must be contiguous")
        nbytes = memory.numel() * memory.element_size()
        if memory.is_cuda:
            return memory.data_ptr(), nbytes, "VRAM", memory.device.index or 0
        return memory.data_ptr(), nbytes, "DRAM", 0
    flat = as_bytes(memory)
    return address(flat), flat.nbytes, "DRAM", 0
