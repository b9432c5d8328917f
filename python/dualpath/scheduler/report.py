"""What a DualPath server tells the router over the network: where its KV channel is and how loaded its node is.

Servers and router share nothing but the network and the store mount, so everything the scheduler needs
of a server arrives as one :class:`NodeReport`, served by the server's own HTTP app at ``GET /dualpath/info``
and polled by the router; missed reports mark the server down.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

REPORT_ROUTE = "/dualpath/info"
_AGENT = re.compile(r"[0-9A-Za-z_.-]+")


class KVChannelAddress(msgspec.Struct, frozen=True):
    """A server's KV channel: its NIXL agent name and the routable TCP address of its control socket.

    Written ``agent@host:port`` (``agent@[v6]:port`` for IPv6), in route hints and reports alike.
    """

    agent: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not _AGENT.fullmatch(self.agent):
            raise ValueError(f"a KV agent name is letters, digits, '_', '.' and '-', got {self.agent!r}")
        if not self.host or any(c in self.host for c in "@;=/[] ") or self.host in ("0.0.0.0", "::"):
            raise ValueError(f"a KV channel needs a routable host, got {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"a KV channel port is in 1..65535, got {self.port}")

    @property
    def endpoint(self) -> str:
        """``tcp://host:port``, as ZMQ dials it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.agent}@{self.endpoint.removeprefix('tcp://')}"

    def for_rank(self, rank: int) -> KVChannelAddress:
        """The channel of tensor-parallel rank ``rank`` of the server whose rank 0 listens here: the next ports."""
        return self if rank == 0 else KVChannelAddress(f"{self.agent}.r{rank}", self.host, self.port + rank)

    @classmethod
    def parse(cls, text: str) -> KVChannelAddress:
        """The address written ``agent@host:port``; ``ValueError`` naming the text otherwise."""
        agent, at, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not (at and colon and port.isdigit()):
            raise ValueError(f"a KV channel is 'agent@host:port', got {text!r}")
        return cls(agent, host, int(port))


class NodeReport(msgspec.Struct, frozen=True, kw_only=True):
    """One server's state as the router needs it: identity, KV channel, its node's storage-NIC read queue
    (bytes and seconds to drain it) and the server's DualPath counters since it started."""

    role: Literal["prefill", "decode", "null"]
    node: str
    model: str
    page_size: int
    kv_channel: KVChannelAddress | None  # None until the scheduler process opened it (rank 0's)
    store_namespace: str  # where its pages are stored; "" until SGLang built its host pool
    tp_size: int = 1  # tensor-parallel ranks: rank r's KV channel is kv_channel.for_rank(r)
    # The node's storage NIC (every server of the node): queued and in-flight reads, lifetime reads.
    queued_tokens: int = 0
    queued_bytes: int = 0
    inflight_tokens: int = 0
    inflight_bytes: int = 0
    read_tokens: int = 0
    read_bytes: int = 0
    nic_bytes_per_s: float = 0.0  # 0: not capped (not emulated)
    queue_s: float = 0.0  # seconds the NIC needs for what is queued and in flight (0 when not capped)
    # This server's DualPath counters.
    pages_read: int = 0  # through its own NIC
    pages_from_peers: int = 0  # prefill: pages a DE read and forwarded
    pages_forwarded: int = 0  # decode: pages it read and forwarded to a prefill
    pages_forwarded_from_memory: int = 0  # decode: of those, pages its host pool held (not read from the store)
    bytes_forwarded: int = 0
    fallbacks: int = 0  # prefill: a DE's part read through its own NIC after the DE path failed
    transfer_timeouts: int = 0
    pages_layerwise: int = 0  # prefill: DE pages its forward took layer by layer (admitted before they all landed)
    layers_from_slots: int = 0  # prefill: layers of DE pages placed slot -> device pool, not through the host pool

    @property
    def ready(self) -> bool:
        """Whether DE-side reads can involve the server: its KV channel is open and its pages have a namespace."""
        return self.kv_channel is not None and bool(self.store_namespace)

    @property
    def pending_tokens(self) -> int:
        return self.queued_tokens + self.inflight_tokens

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @staticmethod
    def decode(raw: bytes) -> NodeReport:
        """A report from its JSON; ``ValueError`` on anything else."""
        try:
            return msgspec.json.decode(raw, type=NodeReport)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a DualPath node report: {exc}") from exc
