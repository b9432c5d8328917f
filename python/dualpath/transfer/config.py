"""Transfer configuration: one agent's name, traffic class, fabric QoS and failure timeouts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class TrafficClass(enum.Enum):
    """Model traffic (collectives) has precedence; every KV byte rides the low-priority class."""

    MODEL = "model"
    KV = "kv"


@dataclass(frozen=True)
class FabricQos:
    """UCX settings that put one traffic class on its own InfiniBand SL or RoCE traffic class.

    UCX reads them when an agent's context is created, so they are applied around agent creation only
    (two agents of one process may carry different classes). ``traffic_class`` is the IPv6/GRH traffic
    class byte: on RoCE it is ``DSCP << 2``, which switches map to a priority queue.
    """

    ib_sl: int | None = None
    traffic_class: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ib_sl is not None and not 0 <= self.ib_sl <= 15:
            raise ValueError(f"ib_sl must be in [0, 15], got {self.ib_sl}")
        if self.traffic_class is not None and not 0 <= self.traffic_class <= 255:
            raise ValueError(f"traffic_class must be in [0, 255], got {self.traffic_class}")
        for key in self.extra_env:
            if not key.startswith("UCX_"):
                raise ValueError(f"extra_env only takes UCX_* variables, got {key!r}")

    @classmethod
    def roce_dscp(cls, dscp: int, **kwargs: object) -> FabricQos:
        if not 0 <= dscp <= 63:
            raise ValueError(f"dscp must be in [0, 63], got {dscp}")
        return cls(traffic_class=dscp << 2, **kwargs)  # type: ignore[arg-type]

    def ucx_env(self) -> dict[str, str]:
        env = dict(self.extra_env)
        if self.ib_sl is not None:
            env["UCX_IB_SL"] = str(self.ib_sl)
        if self.traffic_class is not None:
            env["UCX_IB_TRAFFIC_CLASS"] = str(self.traffic_class)
        return env


@dataclass(frozen=True)
class LimiterConfig:
    """The node-wide software priority limiter that stands in for fabric QoS on one host.

    ``path`` names the node: processes that give the same file share one emulated compute NIC of
    ``gbps``. A low-priority grant that has waited ``promote_after_s`` behind model traffic is served
    anyway, which bounds KV starvation to about ``max_grant_bytes`` per ``promote_after_s``.
    """

    path: Path
    gbps: float
    promote_after_s: float = 0.01
    max_grant_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.gbps <= 0:
            raise ValueError(f"limiter gbps must be positive, got {self.gbps}")
        if self.promote_after_s <= 0:
            raise ValueError(f"promote_after_s must be positive, got {self.promote_after_s}")
        if self.max_grant_bytes <= 0:
            raise ValueError(f"max_grant_bytes must be positive, got {self.max_grant_bytes}")

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


@dataclass(frozen=True)
class TransferConfig:
    """One transfer endpoint (a NIXL agent plus its ZMQ control socket).

    ``timeout_s`` bounds every wait on a peer: connecting, the receiver's Expect, one posted transfer,
    and the silence between two layers of one request. A peer that dies is noticed sooner, when its
    control connection drops; one that stalls is noticed by ZMQ heartbeats or by this timeout.
    """

    name: str
    traffic_class: TrafficClass = TrafficClass.KV
    qos: FabricQos = field(default_factory=FabricQos)
    limiter: LimiterConfig | None = None
    host: str = "127.0.0.1"
    port: int = 0
    timeout_s: float = 10.0
    ucx_devices: str = ""
    ucx_threads: int = 0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in " /\0"):
            raise ValueError(f"agent name must be a non-empty plain name, got {self.name!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.ucx_threads < 0:
            raise ValueError(f"ucx_threads must be >= 0, got {self.ucx_threads}")
