"""The systems the simulator compares; each is a scheduler configuration plus two engine switches."""

from __future__ import annotations

from dataclasses import dataclass

from dualpath.scheduler import SchedulerConfig
from dualpath.scheduler.config import PlacementPolicy, ReadPolicy


@dataclass(frozen=True)
class Mode:
    """layerwise: hit KV streams into HBM layer by layer while computing (else it is loaded whole first and
    the batch is capped by HBM); io: False bypasses every read and KV transfer (the Oracle)."""

    name: str
    placement: PlacementPolicy
    read_policy: ReadPolicy
    split_reads: bool = False
    layerwise: bool = True
    io: bool = True

    def scheduler_config(self, alpha_tokens: int, beta_tokens: int, seed: int) -> SchedulerConfig:
        return SchedulerConfig(alpha_tokens=alpha_tokens, beta_tokens=beta_tokens, placement=self.placement,
                               read_policy=self.read_policy, split_reads=self.split_reads, seed=seed)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("basic", "round_robin", "pe_only", layerwise=False),
        Mode("layerwise", "round_robin", "pe_only"),
        Mode("dualpath-rr", "round_robin", "round_robin"),
        Mode("dualpath", "dualpath", "queue"),
        Mode("dualpath-split", "dualpath", "queue", split_reads=True),
        Mode("oracle", "dualpath", "queue", io=False),
    )
}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}") from None
