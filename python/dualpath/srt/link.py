"""The DE read path between two SGLang servers: a PE asks a DE for blocks, the DE reads and forwards them.

The PE drives: when its HiCache prefetch of a DE-side request needs blocks, it expects them from the
request's DE (``KVChannel.expect`` with the page keys as ``meta``). The DE gets those blocks into its block
slots (a block it read for its own decode comes from the cache, one its host pool holds is copied from there,
``held.py``; the rest is read through its own storage NIC) and writes them into the PE's slots with NIXL, one
layer at a time at the low-priority KV traffic class (``traffic.py``): the K plane of layer 0, its V plane,
then layer 1, ... Either side failing fails the request on both; the PE then reads the blocks itself (see
``storage.py``, ``layers.py``), so nothing is lost.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import msgspec
from dualpath.kv import KVGeometry
from dualpath.scheduler.report import KVChannelAddress
from dualpath.srt.blocks import BlockSlots, SlotSource
from dualpath.srt.config import SrtConfig
from dualpath.srt.traffic import compute_nic, kv_qos
from dualpath.transfer import KVChannel, TrafficClass, TransferConfig, TransferFailed, grid_for_buffer
from dualpath.transfer.flows import Inbound
from dualpath.transfer.messages import Expect

log = logging.getLogger(__name__)

GRID = "blocks"


class Fetched(NamedTuple):
    ok: bool
    reason: str
    landing: Inbound | None = None  # a layer-by-layer fetch still under way (every block is at the DE)


def layer_planes(geometry: KVGeometry) -> list[list[int]]:
    """The planes of each model layer in an SGLang page: MHA pages hold all K planes, then all V planes, so
    layer i is planes i and layers + i (K, V); MLA pages hold one latent plane per layer."""
    if geometry.attention == "mla":
        return [[layer] for layer in range(geometry.layers)]
    layers = geometry.layers // 2
    return [[layer, layers + layer] for layer in range(layers)]


def layer_by_layer(geometry: KVGeometry) -> list[int]:
    """The planes of an SGLang page in model-layer order: the order a DE sends them in."""
    return [plane for planes in layer_planes(geometry) for plane in planes]


class KVLink:
    """One server's KV channel over its block slots: fetch from a DE (PE side), serve a PE (DE side)."""

    def __init__(self, config: SrtConfig, slots: BlockSlots, source: SlotSource,
                 count: Callable[..., None] = lambda **_: None) -> None:
        """``source`` fills slots with the blocks a PE asks for (``BlockSlots.fill``); ``count(**deltas)`` tallies
        the server's transfer counters (``StatePublisher.count``)."""
        self.config = config
        self._count = count
        self._slots = slots
        self._source = source
        self._plane_order = layer_by_layer(slots.buffer.layout.geometry)
        self._serving = ThreadPoolExecutor(2, thread_name_prefix="dualpath-serve")
        self._connect_lock = threading.Lock()
        self._ids = itertools.count()
        self.channel = KVChannel(
            TransferConfig(config.kv_channel.agent, TrafficClass.KV, kv_qos(config), compute_nic(config),
                           host=config.kv_host, port=config.kv_channel.port, timeout_s=config.timeout_s),
            on_expect=self._on_expect,
        )
        self.channel.register(grid_for_buffer(GRID, slots.buffer))

    def _connected(self, peer: KVChannelAddress) -> None:
        with self._connect_lock:
            if peer.agent not in self.channel.peers():
                self.channel.connect(peer.agent, peer.endpoint)

    # -- PE side ------------------------------------------------------------------------------------------
    def fetch(self, de_channel: KVChannelAddress, keys: list[str], slots: list[int],
              layerwise: bool = False) -> Fetched:
        """Blocks ``keys`` from the DE whose KV channel is ``de_channel`` (its rank 0), written into ``slots``; with
        tensor parallelism each rank fetches from the DE's rank of the same number, which holds the same shard.

        ``layerwise``: return once the first plane landed (the DE sends only when it holds every block), with the
        transfer still landing; otherwise once every plane did."""
        peer = de_channel.for_rank(self.config.tp_rank)
        try:
            self._connected(peer)
            inbound = self.channel.expect(f"{next(self._ids)}:{keys[0][:16]}", peer.agent, GRID, slots,
                                          meta=msgspec.msgpack.encode(keys))
            if layerwise:
                inbound.wait_layer(self._plane_order[0])
                return Fetched(True, "", inbound)
            inbound.wait_all()
            return Fetched(True, "")
        except TimeoutError as exc:
            self._count(transfer_timeouts=1)
            return Fetched(False, f"timed out: {exc}")
        except (TransferFailed, OSError) as exc:
            return Fetched(False, str(exc))

    # -- DE side ------------------------------------------------------------------------------------------
    def _on_expect(self, peer: str, expect: Expect) -> None:
        if expect.meta:
            self._serving.submit(self._serve, peer, expect)

    def _serve(self, peer: str, expect: Expect) -> None:
        slots: list[int] = []
        try:
            keys = msgspec.msgpack.decode(expect.meta, type=list[str])
            slots = self._slots.fill(keys, self._source)
            if len(slots) < len(keys):
                raise TransferFailed(expect.request_id, f"{len(keys) - len(slots)} of {len(keys)} blocks not held or "
                                                        "stored")
            outbound = self.channel.open_send(expect.request_id, peer, GRID, slots)
            for plane in self._plane_order:
                outbound.send_layer(plane)
            outbound.wait()
            block_bytes = self._slots.buffer.layout.full_block_bytes
            self._count(pages_forwarded=len(slots), bytes_forwarded=len(slots) * block_bytes)
        except Exception as exc:
            log.warning("forwarding %s to %s failed: %s", expect.request_id, peer, exc)
            self.channel.abort(expect.request_id, peer, f"DE could not forward: {exc}")
        finally:
            self._slots.release(slots)

    def close(self) -> None:
        self._serving.shutdown(wait=True)
        self.channel.close()
