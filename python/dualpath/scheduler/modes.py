"""The modes: one table of the systems the router serves and the simulator compares.

A mode is a scheduler placement and read policy (`read_policies.READ_POLICIES`) plus two engine switches
that only the simulator can turn off. A new policy is one function in the registry and one line in MODES.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dualpath.scheduler.config import PlacementPolicy, SchedulerConfig


@dataclass(frozen=True)
class Mode:
    """layerwise: hit KV streams into HBM layer by layer while computing (else it is loaded whole first and
    the batch is capped by HBM); io: False bypasses every read and KV transfer (the Oracle); router: the
    router serves it (``--dualpath-mode``), which needs layerwise and io: its servers always do both."""

    name: str
    placement: PlacementPolicy
    read_policy: str
    summary: str
    layerwise: bool = True
    io: bool = True
    router: bool = False

    def __post_init__(self) -> None:
        if self.router and not (self.layerwise and self.io):
            raise ValueError(f"mode {self.name!r}: the router's servers always stream layerwise and read")

    def scheduler_config(self, base: SchedulerConfig) -> SchedulerConfig:
        """``base`` with this mode's placement and read policy."""
        return replace(base, placement=self.placement, read_policy=self.read_policy)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("basic", "round_robin", "pe_only", "the paper's Basic: every read on the PE side, KV loaded whole",
             layerwise=False),
        Mode("layerwise", "round_robin", "pe_only", "Basic with layerwise prefill"),
        Mode("dualpath-rr", "round_robin", "round_robin", "layerwise, whole requests alternate PE and DE reads"),
        Mode("baseline", "dualpath", "pe_only", "every read on the PE side", router=True),
        Mode("dualpath", "dualpath", "queue", "each request read whole on the side with the shorter "
             "read queue (the paper's)", router=True),
        Mode("split", "dualpath", "split", "one request's reads may be split over PE, DE and a helper DE on a "
             "third node so that their read queues drain together (beyond the paper)", router=True),
        Mode("oracle", "dualpath", "queue", "dualpath without any read or KV transfer (the upper bound)",
             io=False),
    )
}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}") from None
