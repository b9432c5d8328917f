"""DualPath's HiCache storage backend: the block-store backend (``hicache.py``: pages, keys, the stock data
paths) with DualPath's read paths, loaded when the plugin configured the server (``--hicache-storage-backend
dynamic`` with :data:`dualpath.srt.config.BACKEND`'s keys).

Per request (see ``requests.py``):
- PE side (stock): the prefill reads hit pages from the store through its node's storage NIC.
- DE side: the prefill asks the request's DE for the pages (``link.py``) and takes them layer by layer into its
  forward (``layers.py``); if that fails it reads them itself, and a page in neither place ends the hit, so
  the rest is recomputed. The decode reads the prefix for itself only for DE-side requests; for PE-side
  ones the prefill sends it, as in stock PD.
- Split: the DE reads the leading pages (for itself and the prefill), a helper DE (optional) the next
  ones, the prefill the rest; the prefill fetches the DEs' pages as above and sends the DE what follows its own.
- Write-back: the decode writes every full page; the prefill never writes.
- A decode forwards the pages its host pool holds (what it wrote back or read, ``held.py``) from there: only
  the others are read through its storage NIC.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from dualpath.kv import block_keys
from dualpath.scheduler import ReadSide
from dualpath.scheduler.report import KVChannelAddress
from dualpath.scheduler.route_hint import Reader
from dualpath.srt import surface
from dualpath.srt.blocks import fill_missing
from dualpath.srt.config import SrtConfig
from dualpath.srt.early import EarlyReads
from dualpath.srt.held import HeldPages
from dualpath.srt.hicache import BlockStoreBackend
from dualpath.srt.layers import Landing, LayerGate
from dualpath.srt.link import KVLink
from dualpath.srt.requests import CAPACITY, RequestRoutes, Route
from dualpath.srt.state import StatePublisher

log = logging.getLogger(__name__)
EARLY_BATCH = 128  # pages per early read, as HiCache batches its own reads


class DualPathStorage(BlockStoreBackend):
    def __init__(self, storage_config: Any, kwargs: dict | None = None) -> None:
        super().__init__(storage_config, kwargs)
        self.link: KVLink | None = None
        self.held: HeldPages | None = None  # a decode's host-pool pages, forwarded from memory
        self.gate: LayerGate | None = None  # a prefill's layer-by-layer landing of DE pages (layers.py)
        self._early = EarlyReads(CAPACITY)
        self.routes = RequestRoutes(self.config.page_size)
        self.state = StatePublisher(self.config, lambda: self.store.stats().hits if self.store is not None else 0)

    def configure(self, setup: surface.StorageSetup) -> SrtConfig:
        """The configuration the plugin handed down from the server's main process, for this rank."""
        config = SrtConfig.from_env()
        if config is None:
            raise ValueError("the DualPath storage backend was loaded without its configuration: the plugin "
                             "(entry point sglang.srt.plugins: dualpath) did not run in the server's main process")
        if setup.tp_size != config.tp_size:
            raise ValueError(f"the storage backend runs at tp={setup.tp_size}, the server was launched with "
                             f"tp={config.tp_size}")
        return replace(config, tp_rank=setup.tp_rank)

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        if self.config.role == "decode":
            self.held = HeldPages(mem_pool_host, self.shape.page_size)
        self.link = KVLink(self.config, self.slots, self._forwarded, self.state.count)
        if self.config.role == "prefill" and self.config.layerwise:
            self.gate = LayerGate(mem_pool_host, self.slots, self._flat, self.state.count)
            surface.set_layer_counter(surface.device_pool_of(mem_pool_host), self.gate)
        self.state.set_namespace(self.store.config.namespace)
        log.info("DualPath storage: %s node %s, store %s, KV channel %s", self.config.role, self.config.node,
                 self.store.directory, self.config.kv_channel)

    # -- what SGLang calls ---------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        if self.config.role == "decode":
            # The decode reads what its NIC reads for the prefill (all of a DE-side request's hit pages, the
            # leading ones of a split read); the prefill sends the rest, as in stock PD. SGLang's decode counts an
            # inline hit as its own but prefetches only hits of prefetch_threshold tokens or more: a smaller
            # part is left to the prefill, or the decode would wait for pages it never reads.
            route = self.routes.current()
            found = self._store().prefix_length(list(itertools.takewhile(route.read_by_de, keys)))
            return found if found * self.config.page_size >= self.config.prefetch_threshold else 0
        return super().batch_exists(keys, extra_info)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        ok = super().batch_get_v1(keys, host_indices, extra_info)
        self._hold([key for key, hit in zip(keys, ok, strict=True) if hit], host_indices)  # hits lead: i-th at i
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        ok = super().batch_set_v1(keys, host_indices, extra_info)
        self._hold(keys, host_indices)  # in the host pool whether or not the store took them
        return ok

    # -- reading and writing pages -------------------------------------------------------------------------
    def _hold(self, keys: list[str], host_indices: torch.Tensor) -> None:
        if self.held is not None and keys:
            self.held.add(keys, lambda i: int(host_indices[i * self.shape.page_size]))

    def _forwarded(self, keys: list[str], slots: list[int]) -> list[bool]:
        """A decode's source of the blocks a prefill asks for: its host pool's, then the store's."""
        ok = [self.held is not None and self.held.copy(key, self._flat(slot))
              for key, slot in zip(keys, slots, strict=True)]
        if any(ok):
            self.state.count(pages_forwarded_from_memory=sum(ok))
        return fill_missing(self.slots.from_store(self._store()), keys, slots, ok)

    def prefetching(self, rid: str, tokens: list[int], last_key: str | None) -> None:
        """HiCache starts prefetching ``tokens`` for request ``rid``: the prompt past what its device and host memory
        hold (``last_key``: the key of the page before them, None from the start). A request the DualPath router
        placed starts reading their stored pages now, in the background, where the router chose (this node's NIC,
        the DE's or a helper DE's through the KV link; see ``early.py``). The pages land in the slot cache, where
        ``batch_get_v1`` finds them once the reads are done. Requests without a route (stock routers) are read when
        HiCache gets to them, as in stock SGLang. Where HiCache does not prefetch (too short a part, or its
        prefetches in flight fill half its host pool), it recomputes, and nothing is read early either.
        """
        route = self.routes.get(rid)
        if route is None or route.hint is None or self.config.role != "prefill" or self.link is None:
            return
        # The readers of the plan's leading runs that got whole pages, and the last reader (the rest).
        readers = [*dict.fromkeys(route.page_readers.values()), route.hint.plan.readers[-1]]
        started, tokens = time.monotonic(), list(tokens)
        self._early.start(rid, readers, lambda reader: self._fetch_early(route, reader, tokens, last_key, started))

    def _fetch_early(self, route: Route, reader: Reader, tokens: list[int], last_key: str | None,
                     arrived: float) -> None:
        """Read the stored pages of ``tokens`` (following the page keyed ``last_key``) that ``reader`` reads for
        ``route`` into the slot cache."""
        name = reader.agent if reader is not None else "PE"
        try:
            store, page = self._store(), self.shape.page_size
            keys = block_keys(tokens[: len(tokens) // page * page], page, prior_key=last_key)
            keys = [key for key in keys[: store.prefix_length(keys)] if route.reader(key) == reader]
            started = time.monotonic()
            for start in range(0, len(keys), EARLY_BATCH):
                self.slots.release(self._pinned(route, keys[start:start + EARLY_BATCH]))
            # Where a request's time goes before its prefill: queued for a reader, then reading.
            log.info("request %s: %d pages read by %s in %.1f s, %.1f s after it arrived", route.rid,
                     len(keys), name, time.monotonic() - started, time.monotonic() - arrived)
        except Exception:  # the prefetch reads the pages itself when they are not here
            log.exception("request %s: early read by %s failed", route.rid, name)

    def _from_readers(self, route: Route) -> Callable[[list[str], list[int]], list[bool]]:
        """A slot source: the DEs that read pages for this request (its own DE, a helper) for theirs, this
        node's NIC for the rest and for the pages of a DE that fails."""
        def source(keys: list[str], slots: list[int]) -> list[bool]:
            ok = [False] * len(keys)
            remote: dict[KVChannelAddress, list[int]] = {}
            for i, key in enumerate(keys):
                if reader := route.reader(key):
                    remote.setdefault(reader, []).append(i)
            for reader, indices in remote.items():
                keys_from, slots_from = [keys[i] for i in indices], [slots[i] for i in indices]
                fetched = self.link.fetch(reader, keys_from, slots_from, layerwise=self.gate is not None)
                if fetched.landing is not None:
                    self.slots.pin(slots_from)  # the gate's, until the last plane is in the host pool
                    self.gate.track(Landing(route.rid, fetched.landing, slots_from, self.gate.layer_planes,
                                            lambda k=keys_from, s=slots_from: self._recover(k, s)))
                if fetched.ok:
                    self.state.count(pages_from_peers=len(indices))
                    for i in indices:
                        ok[i] = True
                else:
                    self.state.count(fallbacks=len(indices))
                    log.warning("request %s: read path through %s failed (%s); reading on the PE side", route.rid,
                                reader.agent, fetched.reason)
            return fill_missing(self.slots.from_store(self._store()), keys, slots, ok)

        return source

    def _recover(self, keys: list[str], slots: list[int]) -> bool:
        """Read blocks a DE failed to finish forwarding from the store into their slots."""
        self.state.count(fallbacks=len(keys))
        return all(self.slots.from_store(self._store())(keys, slots))

    def _pinned(self, route: Route, keys: list[str]) -> list[int]:
        """Pinned slots holding the leading ``keys``: on a prefill, from the request's DE for the pages the DE
        reads; otherwise from this node's store (the slot cache serves either when it has the page)."""
        if self.config.role == "prefill" and route.side in (ReadSide.DE, ReadSide.SPLIT) and self.link is not None:
            return self.slots.fill(keys, self._from_readers(route))
        return self.slots.read(self._store(), keys)

    def _slots_for(self, keys: list[str]) -> list[int]:
        route, started = self.routes.current(), time.monotonic()
        self._early.wait(route.rid)
        slots = self._pinned(route, keys)
        if time.monotonic() - started > 1.0:  # HiCache's one I/O thread waited: every request behind it did too
            log.info("request %s: HiCache's I/O thread waited %.1f s for %d pages (%s side)", route.rid,
                     time.monotonic() - started, len(keys), route.side.name)
        return slots

    def _place(self, host_index: int, slot: int) -> None:
        if self.gate is not None and self.gate.hold(slot, host_index):  # a page still landing enters layer by layer
            self.state.count(pages_layerwise=1)
        else:
            super()._place(host_index, slot)

    def _write(self, keys: list[str], page: Callable[[int], torch.Tensor]) -> list[bool]:
        if self.config.role == "prefill":
            return [True] * len(keys)  # the decode writes every block back (DESIGN.md section 2)
        return super()._write(keys, page)

    def _landed(self, slot: int) -> torch.Tensor:
        if self.gate is not None:
            self.gate.landed(slot)
        return self._flat(slot)

    @staticmethod
    def on_controller_reset(original: Callable[..., Any], controller: Any, *args: Any, **kwargs: Any) -> Any:
        """A cache flush empties the host pool; the slot cache holds store reads in the same DRAM, so it is
        emptied too. Otherwise a flushed server would serve a prefix again without reading it."""
        result = original(controller, *args, **kwargs)
        backend = surface.storage_backend(controller)
        if isinstance(backend, DualPathStorage) and backend.store is not None:
            backend.slots.forget()
            if backend.held is not None:  # the pool was cleared without freeing its pages
                backend.held.clear()
        return result

    def close(self) -> None:
        self._early.close()
        if self.gate is not None:
            self.gate.close()
        self.state.close()
        if self.link is not None:
            self.link.close()
        if self.held is not None:
            self.held.close()
        super().close()
