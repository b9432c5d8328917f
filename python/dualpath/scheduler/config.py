"""Scheduler thresholds. Defaults are the paper's; alpha/beta are in tokens and must be profiled per cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dualpath.scheduler.placement import ALPHA_SECONDS, BETA_SECONDS
from dualpath.scheduler.read_policies import READ_POLICIES

PlacementPolicy = Literal["dualpath", "round_robin"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Inter-engine scheduling knobs.

    alpha_tokens: a node whose read queue holds at most this many tokens is "short" (paper: 3 s of reads).
    beta_tokens: a PE holding more unfinished tokens than this gets no work (paper: 5 s of GPU processing).
    z_factor: DE high-token threshold Z = z_factor x group average (paper: 1.05).
    placement: "dualpath" (the paper's rules) or "round_robin" (the ablation's naive scheduler).
    read_policy: a name in READ_POLICIES: "queue" (paper: shorter node read queue), "pe_only" (Basic),
        "round_robin" (alternate sides) or "split" (one request's hit over both sides and a helper DE so that
        their queues drain together; beyond the paper).
    split_block_tokens: "split" cuts at multiples of this (the store's Full Block size).
    prefill_tokens_per_s: a PE's prompt tokens per second of compute alone ("split" keeps a hit whole on the PE
        where its node reads it before the PE has computed what it holds); 0: beta's rate.
    seed: tie-breaks among equal candidates use a seeded order, so a given state always gives one answer.
    """

    alpha_tokens: int = 3 * 1_250_000
    beta_tokens: int = 5 * 40_000
    z_factor: float = 1.05
    placement: PlacementPolicy = "dualpath"
    read_policy: str = "queue"
    split_block_tokens: int = 64
    prefill_tokens_per_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.alpha_tokens < 0 or self.beta_tokens < 0:
            raise ValueError(f"alpha_tokens and beta_tokens must be >= 0, got {self.alpha_tokens}, {self.beta_tokens}")
        if self.z_factor < 1.0:
            raise ValueError(f"z_factor must be >= 1.0, got {self.z_factor}")
        if self.placement not in ("dualpath", "round_robin"):
            raise ValueError(f"unknown placement {self.placement!r}")
        if self.read_policy not in READ_POLICIES:
            raise ValueError(f"unknown read_policy {self.read_policy!r}; choose from {', '.join(READ_POLICIES)}")
        if self.prefill_tokens_per_s < 0:
            raise ValueError(f"prefill_tokens_per_s must be >= 0, got {self.prefill_tokens_per_s}")
        if self.split_block_tokens < 1:
            raise ValueError(f"split_block_tokens must be >= 1, got {self.split_block_tokens}")

    @staticmethod
    def profiled(read_tokens_per_s: float, gpu_tokens_per_s: float, **overrides: object) -> SchedulerConfig:
        """The paper's definitions: alpha = 3 s of one node's reads, beta = 5 s of one GPU's processing."""
        if read_tokens_per_s <= 0 or gpu_tokens_per_s <= 0:
            raise ValueError(f"rates must be positive, got {read_tokens_per_s}, {gpu_tokens_per_s}")
        overrides.setdefault("prefill_tokens_per_s", gpu_tokens_per_s)
        return SchedulerConfig(
            alpha_tokens=int(ALPHA_SECONDS * read_tokens_per_s), beta_tokens=int(BETA_SECONDS * gpu_tokens_per_s),
            **overrides  # type: ignore[arg-type]
        )
