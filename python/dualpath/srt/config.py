"""DualPath settings of one SGLang server, passed to every process it spawns through the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import msgspec

ENV = "DUALPATH_SRT_CONFIG"
CPU_ENV = "DUALPATH_CPU_SUPPORT"
Role = Literal["prefill", "decode", "null"]


@dataclass(frozen=True)
class SrtConfig:
    """What the plugin needs in the scheduler processes; set by ``python -m dualpath.launch_server``.

    ``node`` names the storage NIC this server reads through (servers that give the same node share
    its cap and read queue); ``kv_port`` is where its KV channel listens for peers.
    """

    role: Role
    node: str
    store_root: str
    kv_port: int
    kv_host: str = "127.0.0.1"
    nic_gbps: float | None = None
    staging_blocks: int = 512
    timeout_s: float = 10.0
    # PE compute quota per prefill batch (0: SGLang's own token budgets) and the attention cost model
    # (base_s, per_token_s, per_pair_s) it predicts with; empty: AttentionCostModel's defaults.
    prefill_quota_ms: float = 0.0
    cost_model: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "null"):
            raise ValueError(f"role must be prefill, decode or null, got {self.role!r}")
        if not self.node or "/" in self.node:
            raise ValueError(f"node must be a plain name, got {self.node!r}")
        if not 0 < self.kv_port < 65536:
            raise ValueError(f"kv_port must be a TCP port, got {self.kv_port}")
        if self.staging_blocks <= 0 or self.timeout_s <= 0:
            raise ValueError("staging_blocks and timeout_s must be positive")
        if self.prefill_quota_ms < 0 or len(self.cost_model) not in (0, 3) or any(c < 0 for c in self.cost_model):
            raise ValueError(f"prefill_quota_ms must be >= 0 and cost_model 3 non-negative numbers, got "
                             f"{self.prefill_quota_ms}, {self.cost_model}")

    @property
    def kv_agent(self) -> str:
        return f"{self.role}-{self.node}-{self.kv_port}"

    @property
    def kv_channel(self) -> str:
        """``agent@host:port``, as a RouteHint names it."""
        return f"{self.kv_agent}@{self.kv_host}:{self.kv_port}"

    @property
    def announcement(self) -> str:
        """Where the scheduler process publishes what only it knows (the store namespace of its pages)."""
        return f"{self.store_root}/servers/{self.kv_agent}.json"

    def to_env(self) -> str:
        return msgspec.json.encode(self).decode()

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> SrtConfig | None:
        """The configuration in ``$DUALPATH_SRT_CONFIG``, or None when DualPath is off."""
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        try:
            return msgspec.json.decode(raw, type=SrtConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(f"${ENV} is not a valid DualPath configuration: {exc}") from exc
