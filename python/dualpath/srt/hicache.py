"""The block store as a HiCache storage backend with stock SGLang's data paths (``BlockStoreBackend``).

Loaded by SGLang's backend factory (``--hicache-storage-backend dynamic`` with :data:`PLAIN_BACKEND`'s keys
in the extra-config) in each scheduler process, zero-copy interface (``interface_v1``). Pages are SGLang's
flat host pages in the ``layer_first`` layout (MHA: all K planes, then all V planes; MLA: one latent plane
per layer), stored as Full Blocks of those planes under SGLang's own page keys, so any server finds what
another wrote. A server reads the hit pages SGLang prefetches through its node's storage NIC and writes every
page SGLang backs up, as with any stock backend: this is the stock baseline DualPath is measured against.
DualPath's backend (``storage.py``) extends it with its read paths.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dualpath.kv import KVGeometry
from dualpath.srt import surface
from dualpath.srt.blocks import BlockSlots
from dualpath.srt.config import SrtConfig
from dualpath.store import BlockStatus, BlockStore, StoreConfig

log = logging.getLogger(__name__)


def page_geometry(shape: surface.PoolShape, model_name: str, tp_rank: int = 0, tp_size: int = 1) -> KVGeometry:
    """The Full Block of one SGLang host page: its planes (MHA: ``2 x layers``, all K then all V; MLA: one
    latent per layer) of ``heads x head_dim`` elements per token. With tensor parallelism an MHA rank holds its
    share of the heads, stored apart (``-tp<rank>of<size>``); MLA ranks all hold the whole latent, stored once."""
    if shape.layout != "layer_first":
        raise ValueError(f"the block store keeps layer_first host pages; the server uses {shape.layout!r} "
                         "(start it with --hicache-mem-layout layer_first)")
    dtype = str(shape.dtype).removeprefix("torch.")
    name = re.sub(r"[^0-9A-Za-z_.-]", "_", Path(model_name).name or "model")
    if shape.attention == "mha" and tp_size > 1:
        name += f"-tp{tp_rank}of{tp_size}"
    return KVGeometry(f"sglang-{name}-{dtype}", shape.planes, shape.heads * shape.head_dim * shape.dtype.itemsize,
                      dtype, shape.attention, shape.heads, shape.head_dim)


class BlockStoreBackend(surface.resolve("storage_base")):
    def __init__(self, storage_config: Any, kwargs: dict | None = None) -> None:
        setup = surface.storage_setup(storage_config)
        if setup.pp_size != 1:
            raise ValueError(f"the block store serves one pipeline stage per server in this version; got "
                             f"pp={setup.pp_size}")
        self.config = self.configure(setup)
        self.model_name = setup.model_name or "model"
        self.pool: Any = None  # SGLang's host KV pool
        self.shape: surface.PoolShape | None = None
        self.store: BlockStore | None = None
        self.slots: BlockSlots | None = None
        self._pages_moved: dict[str, list[int]] = {"prefetch": [], "backup": []}  # since get_stats() was last called

    def configure(self, setup: surface.StorageSetup) -> SrtConfig:
        """This backend's settings, from the extra-config SGLang hands every backend."""
        return SrtConfig.plain(setup.extra_config, setup.model_name or "model", setup.tp_rank, setup.tp_size)

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        shape = surface.pool_shape(mem_pool_host)
        self.pool, self.shape = mem_pool_host, shape
        geometry = page_geometry(shape, self.model_name, self.config.tp_rank, self.config.tp_size)
        self.store = BlockStore(StoreConfig(self.config.store_root, model=geometry,
                                            block_tokens=shape.page_size, node=self.config.node,
                                            nic_gbps=self.config.nic_gbps))
        self.slots = BlockSlots(self.store.layout, self.config.staging_blocks, self.config.timeout_s)

    # -- what SGLang calls ---------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        return self._store().prefix_length(keys)

    def exists(self, key: str) -> bool:
        return self._store().prefix_length([key]) == 1

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._guarded(keys, lambda: self._read(
            keys, lambda i, slot: self._place(int(host_indices[i * self.shape.page_size]), slot)))

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        targets = list(target_locations)
        ok = self._read(keys, lambda i, slot: targets[i].view(-1).copy_(self._landed(slot)))
        return [t if hit else None for t, hit in zip(targets, ok, strict=True)]

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        return self.batch_get([key], [target_location])[0]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        return self._guarded(keys, lambda: self._write(
            keys, lambda i: surface.host_page(self.pool, int(host_indices[i * self.shape.page_size]))))

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        sources = list(values)
        return all(self._write(keys, lambda i: sources[i]))

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def get_stats(self) -> Any:
        """Pages per batch read and written since the last call, as SGLang's storage-metrics collector takes them
        (``--enable-metrics``)."""
        moved, self._pages_moved = self._pages_moved, {"prefetch": [], "backup": []}
        return surface.resolve("storage_metrics")(prefetch_pgs=moved["prefetch"], backup_pgs=moved["backup"])

    # -- reading and writing pages -------------------------------------------------------------------------
    @staticmethod
    def _guarded(keys: list[str], call: Callable[[], list[bool]]) -> list[bool]:
        """HiCache's I/O threads die on an exception; a failed batch is reported as missed pages instead."""
        try:
            return call()
        except Exception:
            log.exception("block store: %d pages failed", len(keys))
            return [False] * len(keys)

    def _slots_for(self, keys: list[str]) -> list[int]:
        """Pinned slots holding the leading ``keys`` that are stored, read through this node's NIC. A stock
        backend keeps no read cache of its own: SGLang's host pool is the cache."""
        store = self._store()
        slots = self.slots.take(len(keys))
        statuses = store.read(keys, self.slots.buffer.blocks(slots))
        found = sum(1 for _ in itertools.takewhile(lambda status: status is BlockStatus.OK, statuses))
        self.slots.release(slots[found:])
        return slots[:found]

    def _read(self, keys: list[str], place: Callable[[int, int], None]) -> list[bool]:
        slots = self._slots_for(keys)
        try:
            for i, slot in enumerate(slots):
                place(i, slot)
        finally:
            self.slots.release(slots)
        self._pages_moved["prefetch"].append(len(slots))
        return [i < len(slots) for i in range(len(keys))]

    def _place(self, host_index: int, slot: int) -> None:
        surface.set_host_page(self.pool, host_index, self._flat(slot))

    def _write(self, keys: list[str], page: Callable[[int], torch.Tensor]) -> list[bool]:
        if self.shape.attention == "mla" and self.config.tp_rank > 0:
            return [True] * len(keys)  # every MLA rank holds the whole latent: rank 0 writes it
        store = self._store()
        slots = self.slots.take(len(keys))
        try:
            for i, slot in enumerate(slots):
                source = page(i)  # a strided view of the host pool: one copy, straight into the slot
                self._flat(slot).view(source.shape).copy_(source)
            statuses = store.write(keys, self.slots.buffer.blocks(slots))
        finally:
            self.slots.release(slots)
        self._pages_moved["backup"].append(len(keys))
        return [status in (BlockStatus.OK, BlockStatus.EXISTS) for status in statuses]

    def _flat(self, slot: int) -> torch.Tensor:
        return torch.from_numpy(self.slots.block(slot).reshape(-1)).view(self.shape.dtype)

    def _landed(self, slot: int) -> torch.Tensor:
        return self._flat(slot)

    def _store(self) -> BlockStore:
        if self.store is None:
            raise RuntimeError("the block-store backend is used before SGLang registered its host pool")
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
