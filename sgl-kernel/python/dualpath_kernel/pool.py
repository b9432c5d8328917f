"""SGLang's paged device KV pool, seen as per-layer byte rows, and staging views of Full Blocks.

SGLang keeps one buffer per layer and per component: MHA/GQA pools (``MHATokenToKVPool``) hold K and V
buffers of ``[slots, kv_heads, head_dim]``, MLA pools (``MLATokenToKVPool``) one ``[slots, 1,
kv_lora_rank + rope_dim]`` buffer. Slot ``s`` belongs to page ``s // page_size``. One token of one layer
in a Full Block is the concatenation of its component rows (K then V), so kernels only ever move bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from dualpath.kv import BlockBuffer, KVGeometry

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def power_of_two_dividing(*values: int, limit: int = 16) -> int:
    """Largest power of two, at most ``limit``, that divides every value."""
    alignment = limit
    for value in values:
        while value % alignment:
            alignment //= 2
    return alignment


@dataclass(frozen=True)
class PagedKVPool:
    """Per-layer component buffers of one pool: ``buffers[layer][component]`` (``(K, V)`` or ``(latent,)``)."""

    buffers: tuple[tuple[torch.Tensor, ...], ...]
    page_size: int
    # Device-side table of every buffer's address, built once: kernels index it by (layer, component).
    address_table: torch.Tensor = field(init=False, repr=False, compare=False)
    # Largest power of two (up to 16) dividing every buffer address: bounds the kernels' vector width.
    address_alignment: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if not self.buffers or not self.buffers[0]:
            raise ValueError("a pool needs at least one layer with at least one buffer")
        first = self.buffers[0][0]
        for layer, parts in enumerate(self.buffers):
            if len(parts) != len(self.buffers[0]):
                raise ValueError(f"layer {layer} has {len(parts)} buffers, layer 0 has {len(self.buffers[0])}")
            for buffer in parts:
                if buffer.shape != first.shape or buffer.dtype != first.dtype or buffer.device != first.device:
                    raise ValueError(
                        f"layer {layer}: buffer {tuple(buffer.shape)} {buffer.dtype} on {buffer.device} differs "
                        f"from layer 0's {tuple(first.shape)} {first.dtype} on {first.device}"
                    )
                if not buffer.is_contiguous():
                    raise ValueError(f"layer {layer}: pool buffers must be contiguous")
        if first.dim() != 3:
            raise ValueError(f"pool buffers must be [slots, heads, head_dim], got shape {tuple(first.shape)}")
        if first.shape[0] % self.page_size:
            raise ValueError(f"{first.shape[0]} slots is not a whole number of pages of {self.page_size}")
        addresses = [buffer.data_ptr() for parts in self.buffers for buffer in parts]
        object.__setattr__(self, "address_table", torch.tensor(addresses, dtype=torch.int64, device=first.device))
        object.__setattr__(self, "address_alignment", power_of_two_dividing(*addresses))

    @classmethod
    def mha(cls, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor], page_size: int) -> PagedKVPool:
        if len(k_buffers) != len(v_buffers):
            raise ValueError(f"{len(k_buffers)} K buffers but {len(v_buffers)} V buffers")
        return cls(tuple(zip(k_buffers, v_buffers, strict=True)), page_size)

    @classmethod
    def mla(cls, kv_buffers: Sequence[torch.Tensor], page_size: int) -> PagedKVPool:
        return cls(tuple((buffer,) for buffer in kv_buffers), page_size)

    @classmethod
    def from_sglang(cls, token_to_kv_pool: object) -> PagedKVPool:
        """Wrap a live ``MHATokenToKVPool`` / ``MLATokenToKVPool`` (their buffers, not copies)."""
        page_size = token_to_kv_pool.page_size  # type: ignore[attr-defined]
        if hasattr(token_to_kv_pool, "kv_buffer"):
            return cls.mla(token_to_kv_pool.kv_buffer, page_size)
        if hasattr(token_to_kv_pool, "k_buffer") and hasattr(token_to_kv_pool, "v_buffer"):
            return cls.mha(token_to_kv_pool.k_buffer, token_to_kv_pool.v_buffer, page_size)
        raise ValueError(f"{type(token_to_kv_pool).__name__} has neither kv_buffer nor k_buffer/v_buffer")

    @classmethod
    def allocate(
        cls, geometry: KVGeometry, pages: int, page_size: int, device: torch.device | str = "cpu"
    ) -> PagedKVPool:
        """An uninitialised pool shaped as SGLang shapes it for ``geometry``."""
        if pages <= 0:
            raise ValueError(f"pages must be positive, got {pages}")
        dtype = TORCH_DTYPES[geometry.dtype]
        element = dtype.itemsize
        slots = pages * page_size
        if geometry.attention == "mla":
            # Packed caches (FP8 latent + scales + bf16 rope) are stored by SGLang as raw bytes.
            packed = geometry.bytes_per_token_per_layer != geometry.head_dim * element
            shape = (slots, 1, geometry.bytes_per_token_per_layer if packed else geometry.head_dim)
            dtype = torch.uint8 if packed else dtype
            return cls.mla([torch.empty(shape, dtype=dtype, device=device) for _ in range(geometry.layers)], page_size)
        shape = (slots, geometry.kv_heads, geometry.head_dim)
        k_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(geometry.layers)]
        v_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(geometry.layers)]
        return cls.mha(k_buffers, v_buffers, page_size)

    @property
    def layers(self) -> int:
        return len(self.buffers)

    @property
    def components(self) -> int:
        return len(self.buffers[0])

    @property
    def pages(self) -> int:
        return self.buffers[0][0].shape[0] // self.page_size

    @property
    def device(self) -> torch.device:
        return self.buffers[0][0].device

    @property
    def row_bytes(self) -> int:
        """Bytes of one token in one component buffer (one K row, or one MLA latent)."""
        first = self.buffers[0][0]
        return first[0].numel() * first.element_size()

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one layer: a Full Block's ``bytes_per_token_per_layer``."""
        return self.components * self.row_bytes

    def page_rows(self, layer: int, component: int) -> torch.Tensor:
        """``[pages, page_size, row_bytes]`` uint8 view of one buffer (shares its memory)."""
        buffer = self.buffers[layer][component]
        return buffer.view(torch.uint8).view(self.pages, self.page_size, self.row_bytes)


def block_range(buffer: BlockBuffer, start: int, count: int) -> torch.Tensor:
    """``[count, layers, tokens, bytes]`` uint8 tensor over Full Blocks ``start..start+count`` of ``buffer``.

    It shares the buffer's memory and keeps its page-aligned block stride, so a staging region filled by
    the store or by NIXL is scattered without a copy.
    """
    if count <= 0 or start < 0 or start + count > buffer.capacity:
        raise ValueError(f"blocks [{start}, {start + count}) are not inside a buffer of {buffer.capacity}")
    layers, tokens, token_bytes = buffer.layout.shape
    region = torch.from_numpy(buffer.region)
    return region.as_strided(
        (count, layers, tokens, token_bytes),
        (buffer.stride, tokens * token_bytes, token_bytes, 1),
        start * buffer.stride,
    )
