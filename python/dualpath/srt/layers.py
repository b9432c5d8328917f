"""Layer by layer into the prefill's forward: the DE's KV enters the forward one layer at a time.

A DE sends a request's hit pages plane by plane in model-layer order (``link.layer_by_layer``). The
prefill admits the request as soon as the DE holds every page (its first plane landed) instead of when
the last plane lands, and leaves the pages' host-pool entries to the :class:`LayerGate`:
- SGLang loads a batch's host pages into the device pool layer by layer before the forward
  (``load_to_device_per_layer``); the gate loads the pages that are in the host pool and defers the
  others, filed under the load batch SGLang's counter is producing (a few may be in flight).
- The forward of layer i asks the device pool for its KV, which asks its layer counter (SGLang's
  ``LayerDoneCounter.wait_until``); the gate stands in that place: it waits for layer i's planes only and
  places them from the staging slots straight into the device pool's pages (``dualpath_kernel``, one
  launch per layer: the Triton kernel on a GPU, reading the pinned slots over PCIe; torch on CPU), then
  defers to SGLang's counter.
- When all planes of a fetch have landed, the gate copies its pages into the host pool (where the radix
  tree expects them), off the forward's path, and releases the slots once the device placements that
  read them are done. Freeing host pages still landing waits for that first, so a page is never reused
  under a transfer.
If the DE fails mid-way, the prefill reads the fetch's pages from the store itself (``Landing``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from dualpath.srt import surface
from dualpath.srt.blocks import BlockSlots
from dualpath.srt.link import layer_planes
from dualpath.transfer import TransferFailed
from dualpath.transfer.flows import Inbound
from dualpath_kernel import Backend, PagedKVPool, block_range, scatter_blocks

log = logging.getLogger(__name__)
SETTLING_THREADS = 8


class Landing:
    """One fetch from a DE still landing in block slots (pinned until it is settled)."""

    def __init__(self, rid: str, inbound: Inbound, slots: Sequence[int], layer_planes: Sequence[Sequence[int]],
                 recover: Callable[[], bool]) -> None:
        """``recover()`` reads the fetch's blocks from the store into ``slots`` (True: all of them)."""
        self.rid, self.slots = rid, list(slots)
        self._inbound, self.layer_planes, self._recover = inbound, layer_planes, recover
        self._lock = threading.Lock()
        self._recovered: bool | None = None

    def wait_layer(self, layer: int) -> bool:
        """Wait until ``layer`` is in the slots; False when neither the DE nor the store could deliver it."""
        return self._wait(lambda: [self._inbound.wait_layer(plane) for plane in self.layer_planes[layer]])

    def wait_all(self) -> bool:
        return self._wait(self._inbound.wait_all)

    def _wait(self, wait: Callable[[], object]) -> bool:
        try:
            wait()
            return True
        except (TransferFailed, TimeoutError) as exc:
            with self._lock:
                if self._recovered is None:
                    log.warning("request %s: the DE failed mid-transfer (%s); reading its pages on the PE side",
                                self.rid, exc)
                    self._recovered = self._recover()
                return self._recovered


class _Held(NamedTuple):
    landing: Landing
    slot: int
    placements: list[Any]  # CUDA events of device placements reading the slot (none on CPU: copies are done)


class _Deferred(NamedTuple):
    host: torch.Tensor  # token indices of whole pages, on the CPU
    device_pages: torch.Tensor
    load: Callable[[torch.Tensor, torch.Tensor], None]  # SGLang's load of (host, device) token indices


class LayerGate:
    """The prefill device pool's layer counter while DE pages land; SGLang's own counter does the rest."""

    def __init__(self, host_pool: Any, slots: BlockSlots, flat: Callable[[int], torch.Tensor],
                 count: Callable[..., None] = lambda **_: None) -> None:
        """``slots`` hold SGLang's ``layer_first`` pages as they land; ``flat(slot)`` is one as a tensor of the
        pool's dtype; ``count(**deltas)`` tallies the server's counters (``StatePublisher.count``)."""
        self._pool, self._slots, self._flat, self._count = host_pool, slots, flat, count
        device_pool = surface.device_pool_of(host_pool)
        self._counter = surface.layer_counter(device_pool)
        self.layer_planes = layer_planes(slots.buffer.layout.geometry)
        self._page = surface.pool_shape(host_pool).page_size
        layers, components = len(self.layer_planes), len(self.layer_planes[0])
        self._device = PagedKVPool(tuple(surface.layer_buffers(device_pool, layer) for layer in range(layers)),
                                   self._page)
        # [slot, component, layer, token, row bytes]: the slots as the kernel reads them (no copy)
        self._staging = block_range(slots.buffer, 0, slots.buffer.capacity).unflatten(1, (components, layers))
        self._registered = self._device.device.type == "cuda"
        # On CPU the torch copy: CPU servers run Triton's interpreter (cpu.py), which takes ~0.3 s a layer.
        self._backend: Backend = "auto" if self._registered else "torch"
        if self._registered:  # the kernel reads the slots over PCIe: page-locked for the GPU, as NIXL's are for the NIC
            region = self._staging.untyped_storage()
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(region.data_ptr(), region.nbytes(), 0))
        self._cond = threading.Condition()
        self._landing_of_slot: dict[int, Landing] = {}
        self._held: dict[int, _Held] = {}  # host page number -> where its planes land
        # (SGLang's load producer, layer) -> deferred loads: a batch's forward consumes its own producer's loads
        self._deferred: dict[tuple[int, int], list[_Deferred]] = defaultdict(list)
        self._device_pages: tuple[torch.Tensor | None, torch.Tensor] = (None, torch.empty(0))
        # One thread per fetch in flight: a stalled DE's fetch must not hold back another's settling.
        self._settling = ThreadPoolExecutor(SETTLING_THREADS, thread_name_prefix="dualpath-landing")
        self.waited_s = 0.0  # the forward's time waiting for layers to land (not compute: see batching.py)

    # -- the storage backend --------------------------------------------------------------------------------
    def track(self, landing: Landing) -> None:
        """Take over ``landing`` (its slots pinned once for it) until its last plane is in the host pool."""
        with self._cond:
            self._landing_of_slot.update(dict.fromkeys(landing.slots, landing))
        self._settling.submit(self._settle, landing)

    def hold(self, slot: int, host_index: int) -> bool:
        """Let the page of ``slot`` enter the forward at host index ``host_index`` layer by layer; False when the
        slot is not landing (copy it whole)."""
        with self._cond:
            landing = self._landing_of_slot.get(slot)
            if landing is None:
                return False
            self._slots.pin([slot])
            self._held[host_index // self._page] = _Held(landing, slot, [])
            return True

    def landed(self, slot: int) -> None:
        """Wait until the block of ``slot`` has landed whole."""
        with self._cond:
            self._cond.wait_for(lambda: slot not in self._landing_of_slot)

    # -- SGLang's calls ---------------------------------------------------------------------------------------
    def load(self, original: Callable[..., None], host_pool: Any, device_pool: Any, host_indices: torch.Tensor,
             device_indices: torch.Tensor, layer: int, io_backend: str) -> None:
        """``load_to_device_per_layer``: now for the pages in the host pool, at ``wait_until(layer)`` for the others."""
        with self._cond:
            held = torch.tensor(list(self._held), dtype=host_indices.dtype) if self._held else None
        if held is None:
            return original(host_pool, device_pool, host_indices, device_indices, layer, io_backend)
        landing = torch.isin(torch.div(host_indices.cpu(), self._page, rounding_mode="floor"), held)
        if not landing.any():
            return original(host_pool, device_pool, host_indices, device_indices, layer, io_backend)
        host_mask, device_mask = landing.to(host_indices.device), landing.to(device_indices.device)
        if not landing.all():
            original(host_pool, device_pool, host_indices[~host_mask], device_indices[~device_mask], layer, io_backend)
        deferred = _Deferred(host_indices[host_mask].cpu(), self._pages_of(device_indices)[landing[::self._page]],
                             lambda host, device: original(host_pool, device_pool, host, device, layer, io_backend))
        with self._cond:
            self._deferred[surface.load_producer(self._counter), layer].append(deferred)

    def wait_until(self, layer: int) -> None:
        """The forward is about to read ``layer``: place what of it is still landing, then SGLang's wait."""
        with self._cond:
            deferred = self._deferred.pop((surface.load_consumer(self._counter), layer), [])
        for entry in deferred:
            self._place(entry, layer)
        if self._counter is not None:  # a device pool without HiCache's loads has none
            self._counter.wait_until(layer)

    def settle(self, host_indices: torch.Tensor) -> None:
        """Wait until no page of ``host_indices`` is landing (before SGLang frees them)."""
        pages = set(host_pages(host_indices, self._page))
        with self._cond:
            self._cond.wait_for(lambda: pages.isdisjoint(self._held))

    # -- placing ----------------------------------------------------------------------------------------------
    def _pages_of(self, device_indices: torch.Tensor) -> torch.Tensor:
        """Device page of each page of token indices; SGLang passes the same tensor for every layer, read once."""
        if self._device_pages[0] is not device_indices:
            self._device_pages = (device_indices, device_indices.cpu()[::self._page] // self._page)
        return self._device_pages[1]

    def _place(self, entry: _Deferred, layer: int) -> None:
        host_pages = entry.host[::self._page] // self._page
        with self._cond:
            landings = {held.landing for page in host_pages.tolist() if (held := self._held.get(page)) is not None}
        started = time.perf_counter()
        landed = {landing for landing in landings if landing.wait_layer(layer)}
        self.waited_s += time.perf_counter() - started
        with self._cond:
            held = [self._held.get(page) for page in host_pages.tolist()]
            placing = [i for i, one in enumerate(held) if one is not None and one.landing in landed]
            if placing:
                scatter_blocks(self._staging[:, :, layer:layer + 1], self._device, entry.device_pages[placing],
                               slots=[held[i].slot for i in placing], first_layer=layer, backend=self._backend)
                self._count(layers_from_slots=len(placing))
                if self._registered:
                    event = torch.cuda.Event()
                    event.record()
                    for i in placing:
                        held[i].placements.append(event)
        settled = torch.tensor([one is None for one in held])  # settled meanwhile: the host pool has them
        if settled.any():
            tokens = settled.repeat_interleave(self._page)
            entry.load(entry.host[tokens], self._device_tokens(entry.device_pages[settled]))

    def _device_tokens(self, pages: torch.Tensor) -> torch.Tensor:
        tokens = (pages[:, None] * self._page + torch.arange(self._page)).reshape(-1)
        return tokens.to(self._device.device)

    def _settle(self, landing: Landing) -> None:
        ok = landing.wait_all()
        with self._cond:
            pages = [page for page, held in self._held.items() if held.landing is landing]
            held = [self._held.pop(page) for page in pages]
            if ok:
                for page, entry in zip(pages, held, strict=True):
                    surface.set_host_page(self._pool, page * self._page, self._flat(entry.slot))
            for slot in landing.slots:
                self._landing_of_slot.pop(slot, None)
            self._cond.notify_all()
        if not ok:
            log.error("request %s: the DE failed mid-transfer and the store no longer has %d of its pages; they "
                      "were not placed", landing.rid, len(pages))
        for entry in held:
            for event in entry.placements:
                event.synchronize()
        self._slots.release(landing.slots + [entry.slot for entry in held])

    def close(self) -> None:
        self._settling.shutdown(wait=True)
        if self._registered:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self._staging.untyped_storage().data_ptr()))


def host_pages(host_indices: torch.Tensor, page_size: int) -> list[int]:
    """The host-pool pages (index // page size) that ``host_indices`` touch, each once."""
    return torch.unique(torch.div(host_indices.cpu(), page_size, rounding_mode="floor")).tolist()


def on_load(original: Callable[..., None], host_pool: Any, device_pool: Any, host_indices: torch.Tensor,
            device_indices: torch.Tensor, layer: int, io_backend: str) -> None:
    """AROUND ``load_to_device_per_layer`` of SGLang's host pools."""
    gate = surface.layer_counter(device_pool)
    if isinstance(gate, LayerGate):
        return gate.load(original, host_pool, device_pool, host_indices, device_indices, layer, io_backend)
    return original(host_pool, device_pool, host_indices, device_indices, layer, io_backend)


def on_free(original: Callable[..., Any], host_pool: Any, indices: torch.Tensor) -> Any:
    """AROUND ``HostKVCache.free``."""
    gate = surface.layer_counter(surface.device_pool_of(host_pool))
    if isinstance(gate, LayerGate):
        gate.settle(indices)
    return original(host_pool, indices)
