"""Full Block / Layer Block views and page-aligned host buffers that hold them.

A Full Block is ``[layers, tokens, bytes_per_token_per_layer]`` bytes: the Layer Blocks of one token
range, concatenated. A Layer Block is a ``[1, tokens, bytes]`` slice of it, so moving one layer never
copies or reshapes anything.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from dualpath.kv.geometry import KVGeometry

PAGE = 4096


def round_up(n: int, multiple: int = PAGE) -> int:
    return -(-n // multiple) * multiple


def as_bytes(buffer: object) -> np.ndarray:
    """A flat uint8 view of any C-contiguous buffer (numpy array, memoryview, CPU torch tensor)."""
    array = np.asarray(buffer)
    if not array.flags.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return array.reshape(-1).view(np.uint8)


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def aligned_empty(nbytes: int) -> np.ndarray:
    """Page-aligned, zero-filled host memory (anonymous mmap), usable with O_DIRECT and NIXL."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    region = mmap.mmap(-1, round_up(nbytes))
    return np.frombuffer(region, dtype=np.uint8, count=nbytes)


@dataclass(frozen=True)
class BlockLayout:
    """Byte layout of the blocks of one model at one block size."""

    geometry: KVGeometry
    block_tokens: int

    def __post_init__(self) -> None:
        if self.block_tokens <= 0:
            raise ValueError(f"block_tokens must be positive, got {self.block_tokens}")

    @property
    def layer_block_bytes(self) -> int:
        return self.block_tokens * self.geometry.bytes_per_token_per_layer

    @property
    def full_block_bytes(self) -> int:
        return self.geometry.layers * self.layer_block_bytes

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.geometry.layers, self.block_tokens, self.geometry.bytes_per_token_per_layer)

    def full_block(self, buffer: object) -> np.ndarray:
        """View ``buffer`` (exactly one Full Block of bytes) as ``[layers, tokens, bytes]``."""
        flat = as_bytes(buffer)
        if flat.nbytes != self.full_block_bytes:
            raise ValueError(f"a Full Block is {self.full_block_bytes} bytes, buffer has {flat.nbytes}")
        return flat.reshape(self.shape)

    def layer_block(self, full_block: np.ndarray, layer: int) -> np.ndarray:
        """The ``[1, tokens, bytes]`` view of ``layer`` inside a Full Block view (shares its memory)."""
        if full_block.shape != self.shape:
            raise ValueError(f"expected a Full Block view of shape {self.shape}, got {full_block.shape}")
        if not 0 <= layer < self.geometry.layers:
            raise IndexError(f"layer {layer} out of range [0, {self.geometry.layers})")
        return full_block[layer : layer + 1]


class BlockBuffer:
    """``capacity`` Full Blocks in one page-aligned region, each block starting on a page boundary.

    One region means one NIXL registration; page-aligned blocks mean O_DIRECT reads land in place.
    """

    def __init__(self, layout: BlockLayout, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.layout = layout
        self.capacity = capacity
        self.stride = round_up(layout.full_block_bytes)
        self.region = aligned_empty(self.stride * capacity)

    def block(self, index: int) -> np.ndarray:
        """Full Block view of slot ``index``."""
        if not 0 <= index < self.capacity:
            raise IndexError(f"block {index} out of range [0, {self.capacity})")
        start = index * self.stride
        return self.layout.full_block(self.region[start : start + self.layout.full_block_bytes])

    def blocks(self, indices: range | list[int]) -> list[np.ndarray]:
        return [self.block(i) for i in indices]
