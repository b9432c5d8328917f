"""Block store configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualpath.kv import BlockLayout, KVGeometry, get_geometry


@dataclass(frozen=True)
class StoreConfig:
    """Where the store lives, what it holds, and how one process reaches it.

    ``root`` is shared by every process of a host (or by every host on a shared file system). Blocks of
    different models or block sizes live in separate namespaces under it. ``node`` names the storage NIC
    this process reads through: processes that give the same node share its bandwidth cap and read queue.
    """

    root: Path
    # A preset name, or the geometry itself (the SGLang plugin derives it from the server's KV pool).
    model: str | KVGeometry = "deepseek-v3"
    block_tokens: int = 64
    node: str = "node0"
    # Gigabits/s of the emulated storage NIC of `node`; None keeps what the node already has (uncapped
    # when new), 0 removes the cap. The last process to set it wins for every process of the node.
    nic_gbps: float | None = None
    capacity_bytes: int | None = None
    # Eviction frees down to this fraction of capacity so that one scan serves many writes.
    evict_to_fraction: float = 0.9
    io_threads: int = 8
    # A writer starts a new segment file once its current one holds this many bytes.
    segment_bytes: int = 1 << 30
    # None probes the file system once: O_DIRECT where it is supported (not on tmpfs), buffered elsewhere.
    direct_io: bool | None = None
    durable: bool = True
    # A mounted 3FS file system: data then moves through USRBIO rings (hf3fs-py-usrbio).
    hf3fs_mount: Path | None = None
    hf3fs_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.hf3fs_mount is not None:
            object.__setattr__(self, "hf3fs_mount", Path(self.hf3fs_mount))
        if self.nic_gbps is not None and self.nic_gbps < 0:
            raise ValueError(f"nic_gbps must be >= 0, got {self.nic_gbps}")
        if self.capacity_bytes is not None and self.capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {self.capacity_bytes}")
        if not 0 < self.evict_to_fraction <= 1:
            raise ValueError(f"evict_to_fraction must be in (0, 1], got {self.evict_to_fraction}")
        if self.io_threads <= 0:
            raise ValueError(f"io_threads must be positive, got {self.io_threads}")
        if self.segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {self.segment_bytes}")
        if not self.node or "/" in self.node or self.node.startswith("."):
            raise ValueError(f"node must be a plain name, got {self.node!r}")
        self.layout  # noqa: B018 - validates model and block_tokens now, not at first use

    @property
    def geometry(self) -> KVGeometry:
        return self.model if isinstance(self.model, KVGeometry) else get_geometry(self.model)

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.geometry, self.block_tokens)

    @property
    def namespace(self) -> str:
        return f"{self.geometry.name}-{self.block_tokens}t"

    @property
    def nic_bytes_per_s(self) -> float | None:
        return None if self.nic_gbps is None else self.nic_gbps * 1e9 / 8
