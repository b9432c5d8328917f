"""Read policies: which nodes read one request's hit tokens, once its PE and DE are chosen.

A policy is a function from a `ReadContext` to a `ReadSplit`; `READ_POLICIES` names them for
`SchedulerConfig.read_policy` and the modes' table (`dualpath.scheduler.modes`). A new policy is one
function in the registry and one line in MODES.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dualpath.scheduler.messages import NodeLoad, ReadSide
from dualpath.scheduler.placement import BETA_SECONDS, read_side, split_tokens

if TYPE_CHECKING:
    from dualpath.scheduler.config import SchedulerConfig

UNREPORTED_RATE = NodeLoad(-1, 0).drain_tokens_per_s


@dataclass(frozen=True, slots=True)
class ReadContext:
    """One assignment with hits and the scheduler's view of the nodes. Policies only read it: the scheduler
    charges the returned split to the nodes' read queues."""

    config: SchedulerConfig
    hit: int  # hit tokens to read (> 0)
    pe_node: int
    de_node: int
    de_group: Sequence[int]  # the engines of the DE's group
    reads: int  # assignments with hits placed before this one
    engine_node: Mapping[int, int]  # engine id -> node id, for the engines that reported
    read_q: Mapping[int, int]  # node id -> tokens in its read queue
    drain_rate: Mapping[int, float]  # node id -> its last reported drain rate (tokens/s)
    pe_tokens: int  # the PE's unfinished prompt tokens, this request's included

    def queue(self, node: int) -> int:
        return self.read_q.get(node, 0)

    def rate(self, node: int) -> float:
        """A node's last reported drain rate; a node that has not reported counts as ``NodeLoad(node, 0)``."""
        return self.drain_rate.get(node, UNREPORTED_RATE)

    def pe_compute_s(self) -> float:
        """Seconds of prefill the PE has queued (at the profiled compute rate, else at beta's)."""
        rate = self.config.prefill_tokens_per_s or self.config.beta_tokens / BETA_SECONDS
        return self.pe_tokens / rate if rate else 0.0


class ReadSplit(NamedTuple):
    """Hit tokens read on the PE's node, on the DE's node and on a helper DE's node (helper -1: none)."""

    pe: int
    de: int
    helper: int = -1
    helper_tokens: int = 0


ReadPolicyFn = Callable[[ReadContext], ReadSplit]


def pe_only(ctx: ReadContext) -> ReadSplit:
    """The paper's Basic: the PE's node reads everything."""
    return ReadSplit(ctx.hit, 0)


def round_robin(ctx: ReadContext) -> ReadSplit:
    """The ablation's naive scheduler: whole requests alternate between the sides, PE first."""
    return ReadSplit(ctx.hit, 0) if ctx.reads % 2 == 0 else ReadSplit(0, ctx.hit)


def queue(ctx: ReadContext) -> ReadSplit:
    """The paper's: the whole request on the side whose node has the shorter read queue."""
    if read_side(ctx.queue(ctx.pe_node), ctx.queue(ctx.de_node)) is ReadSide.PE:
        return ReadSplit(ctx.hit, 0)
    return ReadSplit(0, ctx.hit)


def split(ctx: ReadContext) -> ReadSplit:
    """Beyond the paper: the hit divided over PE, DE and a helper DE so that their read queues drain together.
    A hit stays whole on the PE where reads are not the PE's bottleneck: its node is "short" (its queue plus the
    hit within alpha) and reads them before the PE has computed what it holds. There a split would only add DE
    work and a DE->PE hop; where the PE's reads outlast its compute, the split brings them in sooner."""
    pe_reads = ctx.queue(ctx.pe_node) + ctx.hit
    if pe_reads <= ctx.config.alpha_tokens and pe_reads / ctx.rate(ctx.pe_node) <= ctx.pe_compute_s():
        return ReadSplit(ctx.hit, 0)
    helper = helper_de(ctx)
    nodes = [ctx.pe_node, ctx.de_node] + ([ctx.engine_node[helper]] if helper >= 0 else [])
    tokens = split_tokens(ctx.hit, [ctx.queue(n) for n in nodes], [ctx.rate(n) for n in nodes],
                          ctx.config.split_block_tokens)
    if helper < 0 or tokens[2] == 0:
        return ReadSplit(tokens[0], tokens[1])
    return ReadSplit(tokens[0], tokens[1], helper, tokens[2])


def helper_de(ctx: ReadContext) -> int:
    """The DE group's engine on a third node whose read queue drains first (-1 for none): it can read a part
    of a split request and forward it to the PE, so that a node with no read of its own is not idle."""
    best, best_time = -1, 0.0
    for engine in ctx.de_group:
        node = ctx.engine_node.get(engine)
        if node is None or node in (ctx.pe_node, ctx.de_node):
            continue
        drains_in = ctx.queue(node) / ctx.rate(node)
        if best < 0 or drains_in < best_time:
            best, best_time = engine, drains_in
    return best


READ_POLICIES: dict[str, ReadPolicyFn] = {
    "queue": queue,
    "pe_only": pe_only,
    "round_robin": round_robin,
    "split": split,
}
