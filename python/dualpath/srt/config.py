"""DualPath settings of one SGLang server: read from its HiCache storage backend's extra-config.

A server runs DualPath when it is started with ``--hicache-storage-backend dynamic`` and an extra-config whose
``backend_name`` is ``dualpath`` (:data:`BACKEND`, plus the settings of :class:`SrtConfig`, beside SGLang's own
keys such as ``prefetch_threshold``). The server's main process reads and checks them once
(:meth:`SrtConfig.from_extra_config`), resolves the KV channel's address and port, and hands the result to
every process it spawns through the environment (:data:`ENV`), an internal detail no user sets.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import msgspec
from dualpath.interprocess import HOST
from dualpath.scheduler.report import KVChannelAddress

ENV = "DUALPATH_SRT_CONFIG"
CPU_ENV = "DUALPATH_CPU_SUPPORT"
Role = Literal["prefill", "decode", "null"]
# The keys SGLang's `dynamic` loader needs to load the DualPath backend.
BACKEND = {"backend_name": "dualpath", "module_path": "dualpath.srt.storage", "class_name": "DualPathStorage",
           "interface_v1": 1}
# The keys that load the block store as a plain HiCache backend (stock SGLang's data paths, no DualPath role),
# and the settings it takes: the stock baseline of `dualpath ab`.
PLAIN_BACKEND = {"backend_name": "dualpath-blockstore", "module_path": "dualpath.srt.hicache",
                 "class_name": "BlockStoreBackend", "interface_v1": 1}
PLAIN_KEYS = ("node", "store_root", "nic_gbps", "staging_blocks", "timeout_s")
# Extra-config keys that belong to SGLang (its parser pops the prefetch ones before the backend sees them).
SGLANG_KEYS = frozenset({"prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
                         "prefetch_timeout_max", "hicache_storage_pass_prefix_keys", "tp_lcm_size"})
DEFAULT_STORE = Path.home() / ".cache" / "dualpath" / "store"


def runtime_dir() -> Path:
    """Host-local state of this host's DualPath servers (never on the store mount, never read by the router)."""
    return Path(tempfile.gettempdir()) / f"dualpath-{os.getuid()}" / "servers"


@dataclass(frozen=True)
class SrtConfig:
    """One server's DualPath settings. Extra-config keys are the field names below but ``role``, ``model`` and
    ``page_size`` (taken from SGLang's own arguments).

    ``node`` names the storage NIC this server reads through (servers that give the same node share its cap
    and read queue; default: the host). ``kv_host`` is the routable address peers reach its KV channel at
    (default: ``$SGLANG_HOST_IP``, else SGLang's local-IP detection), ``kv_port`` its port (0: a free one).
    """

    role: Role
    node: str = HOST
    store_root: str = str(DEFAULT_STORE)
    kv_host: str = ""
    kv_port: int = 0
    nic_gbps: float | None = None
    # Emulated compute NIC (single-host runs): the servers naming the same one share its cap; SGLang's PD
    # transfer goes first, the DE->PE KV takes the rest. Empty: the node.
    compute_nic: str = ""
    compute_gbps: float | None = None
    # The KV channel's fabric class where the fabric has one: InfiniBand service level, RoCE DSCP.
    kv_ib_sl: int | None = None
    kv_dscp: int | None = None
    # The prefill's forward of layer i waits for the DE's layer i only; False: for every layer (ablation).
    layerwise: bool = True
    staging_blocks: int = 512
    timeout_s: float = 10.0
    # PE compute quota per prefill batch (paper: 300 ms; 0: SGLang's own token budgets) and the attention cost
    # model (base_s, per_token_s, per_pair_s) it predicts with; empty: fitted to the server's own batches.
    prefill_quota_ms: float = 300.0
    cost_model: tuple[float, ...] = ()
    model: str = "model"
    page_size: int = 64
    # Tensor parallelism: the server's ranks (from SGLang's arguments) and the rank of this process (set where
    # the storage backend of one rank runs); rank r's KV channel listens on kv_port + r.
    tp_size: int = 1
    tp_rank: int = 0
    # SGLang's HiCache prefetch threshold (its extra-config key ``prefetch_threshold``, as SGLang parsed it):
    # smaller storage hits are not prefetched.
    prefetch_threshold: int = 256

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "null"):
            raise ValueError(f"role must be prefill, decode or null, got {self.role!r}")
        if not self.node or "/" in self.node or self.node.startswith("."):
            raise ValueError(f"node must be a plain name, got {self.node!r}")
        if not 0 <= self.kv_port < 65536:
            raise ValueError(f"kv_port must be a TCP port (0: a free one), got {self.kv_port}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in 0..tp_size-1, got {self.tp_rank} of {self.tp_size}")
        if self.kv_port + self.tp_size > 65536:
            raise ValueError(f"kv_port {self.kv_port} leaves no port for each of {self.tp_size} ranks")
        if self.staging_blocks <= 0 or self.timeout_s <= 0:
            raise ValueError("staging_blocks and timeout_s must be positive")
        if self.nic_gbps is not None and self.nic_gbps < 0:
            raise ValueError(f"nic_gbps must be >= 0, got {self.nic_gbps}")
        if self.compute_gbps is not None and self.compute_gbps <= 0:
            raise ValueError(f"compute_gbps must be positive, got {self.compute_gbps}")
        if self.kv_ib_sl is not None and not 0 <= self.kv_ib_sl <= 15:
            raise ValueError(f"kv_ib_sl must be in 0..15, got {self.kv_ib_sl}")
        if self.kv_dscp is not None and not 0 <= self.kv_dscp <= 63:
            raise ValueError(f"kv_dscp must be in 0..63, got {self.kv_dscp}")
        if "/" in self.compute_nic or self.compute_nic.startswith("."):
            raise ValueError(f"compute_nic must be a plain name, got {self.compute_nic!r}")
        if self.prefill_quota_ms < 0 or len(self.cost_model) not in (0, 3) or any(c < 0 for c in self.cost_model):
            raise ValueError(f"prefill_quota_ms must be >= 0 and cost_model 3 non-negative numbers, got "
                             f"{self.prefill_quota_ms}, {self.cost_model}")

    @property
    def server_channel(self) -> KVChannelAddress:
        """The server's KV channel as peers and the router know it: rank 0's."""
        return KVChannelAddress(f"{self.role}-{self.node}-{self.kv_port}", self.kv_host, self.kv_port)

    @property
    def kv_channel(self) -> KVChannelAddress:
        """This rank's KV channel."""
        return self.server_channel.for_rank(self.tp_rank)

    def state_path(self, rank: int | None = None) -> Path:
        """Where the scheduler process of ``rank`` (default: this one) publishes what only it knows, for the
        server's HTTP process."""
        port = self.server_channel.for_rank(self.tp_rank if rank is None else rank).port
        return runtime_dir() / f"{self.kv_host}-{port}.json"

    def to_env(self) -> str:
        return msgspec.json.encode(self).decode()

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> SrtConfig | None:
        """The configuration the main process handed down, or None when DualPath is off."""
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        try:
            return msgspec.json.decode(raw, type=SrtConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(f"${ENV} is not a valid DualPath configuration: {exc}") from exc

    @staticmethod
    def plain(extra: dict[str, Any], model: str, tp_rank: int, tp_size: int) -> SrtConfig:
        """The settings of the block store as a plain HiCache backend (:data:`PLAIN_BACKEND`); ``ValueError``
        naming what is wrong."""
        unknown = sorted(set(extra) - set(PLAIN_KEYS) - set(PLAIN_BACKEND) - SGLANG_KEYS)
        if unknown:
            raise ValueError(f"unknown block-store backend extra-config keys {unknown}; known: {list(PLAIN_KEYS)}")
        given = {key: extra[key] for key in PLAIN_KEYS if key in extra}
        try:
            return msgspec.convert({**given, "role": "null", "model": model, "tp_size": tp_size, "tp_rank": tp_rank},
                                   SrtConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(f"block-store backend extra-config: {exc}") from exc

    @staticmethod
    def from_extra_config(extra: dict[str, Any], role: str, model: str, page_size: int, bind_host: str,
                          tp_size: int = 1) -> SrtConfig | None:
        """The settings in a parsed extra-config (None when it does not name the DualPath backend), with the
        KV channel's host and port resolved; ``ValueError`` naming what is wrong otherwise."""
        if extra.get("backend_name") != BACKEND["backend_name"]:
            return None
        for key, needed in BACKEND.items():
            if extra.get(key) != needed and not (key == "interface_v1" and extra.get(key)):
                raise ValueError(f"the DualPath backend needs extra-config {key}={needed!r}, got {extra.get(key)!r}")
        settings = {f.name for f in fields(SrtConfig)} - {"role", "model", "page_size", "tp_size", "tp_rank",
                                                          "prefetch_threshold"}
        unknown = sorted(set(extra) - settings - set(BACKEND) - SGLANG_KEYS)
        if unknown:
            raise ValueError(f"unknown DualPath extra-config keys {unknown}; known: {sorted(settings)}")
        given = {key: value for key, value in extra.items() if key in settings}
        try:
            config = msgspec.convert({**given, "role": role, "model": model, "page_size": page_size,
                                      "tp_size": tp_size}, SrtConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(f"DualPath extra-config: {exc}") from exc
        host = config.kv_host or kv_host_for(bind_host)
        KVChannelAddress("check", host, 1)  # a routable host, or a clear error now
        return replace(config, kv_host=host, kv_port=config.kv_port or free_ports(host, tp_size))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def kv_host_for(bind_host: str) -> str:
    """The KV channel's host when none is given: ``$SGLANG_HOST_IP``, else SGLang's own local-IP detection.

    A detected loopback address is refused unless the server itself listens on loopback (then every peer is
    local): peers on other hosts could not reach it.
    """
    from dualpath.srt import surface

    if os.environ.get("SGLANG_HOST_IP"):
        return os.environ["SGLANG_HOST_IP"]
    host = surface.resolve("local_ip")()
    if _loopback(host) and not _loopback(bind_host):
        raise ValueError(f"the KV channel would advertise {host}, which other hosts cannot reach; give the "
                         "DualPath extra-config key kv_host (or $SGLANG_HOST_IP) a routable address")
    return host


def free_ports(host: str, count: int = 1, attempts: int = 64) -> int:
    """The first of ``count`` consecutive free ports on ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        with contextlib.ExitStack() as held:
            first = held.enter_context(socket.socket(family))
            first.bind((host, 0))
            base = first.getsockname()[1]
            try:
                for port in range(base + 1, base + count):
                    held.enter_context(socket.socket(family)).bind((host, port))
            except OSError:
                continue
            return base
    raise OSError(f"no {count} consecutive free ports on {host} in {attempts} tries")
