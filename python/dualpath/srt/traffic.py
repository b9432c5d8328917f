"""Traffic classes while serving: SGLang's PD transfer first, DualPath's DE->PE KV on the leftover.

On a cluster the fabric keeps them apart: the KV channel's UCX agent puts its traffic on its own InfiniBand
service level or RoCE traffic class (``kv_ib_sl``, ``kv_dscp``; ``transfer.FabricQos``), which the switch
arbitration (DESIGN.md section 5) serves after the high-priority lane. One host has no such fabric, so the
compute NIC is emulated (``compute_gbps``): every server that names the same ``compute_nic`` books its
transfers on one shared ``transfer.PriorityLimiter`` timeline, SGLang's PD KV transfer (``send_kvcache`` of
its NIXL connector) as high-priority traffic, the KV channel's DE->PE writes as low-priority traffic. The
emulated link counts both directions together, as one NIC that a PE and a DE on one host share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dualpath.srt import surface
from dualpath.srt.config import SrtConfig, runtime_dir
from dualpath.transfer import FabricQos, PriorityLimiter
from dualpath.transfer.config import LimiterConfig, TrafficClass

# Low-priority grants small enough that a PD transfer waits at most 64 KiB of DE->PE KV on the link.
KV_GRANT_BYTES = 64 << 10


def compute_nic(config: SrtConfig) -> LimiterConfig | None:
    """The emulated compute NIC this server shares (None: not emulated)."""
    if config.compute_gbps is None:
        return None
    path = runtime_dir().parent / "compute-nics" / (config.compute_nic or config.node)
    return LimiterConfig(path, config.compute_gbps, max_grant_bytes=KV_GRANT_BYTES)


def kv_qos(config: SrtConfig) -> FabricQos:
    """The fabric class of the KV channel's agent."""
    if config.kv_dscp is not None:
        return FabricQos.roce_dscp(config.kv_dscp, ib_sl=config.kv_ib_sl)
    return FabricQos(ib_sl=config.kv_ib_sl)


class PdTransferPacing:
    """AROUND SGLang's PD ``send_kvcache``: book the transfer's bytes on the emulated compute NIC first."""

    def __init__(self, link: LimiterConfig) -> None:
        self._link = link
        self._limiter: PriorityLimiter | None = None  # opened in the process that sends

    def __call__(self, original: Callable[..., Any], manager: Any, peer_name: str, prefill_kv_indices: Any,
                 *args: Any, **kwargs: Any) -> Any:
        if self._limiter is None:
            self._limiter = PriorityLimiter(self._link)
        nbytes = surface.pd_transfer_bytes(manager, prefill_kv_indices)
        if nbytes > 0:
            self._limiter.acquire(nbytes, TrafficClass.MODEL)
        return original(manager, peer_name, prefill_kv_indices, *args, **kwargs)
