"""Online A/B (the paper's Figure 10): the highest agent arrival rate each stack serves within the SLO.

Agents arrive by a Poisson process and run their sessions turn by turn with their trace's think time
(:func:`online.run_load`). For each stack, a bisection over the arrival rate (:func:`online.capacity`) finds the
highest rate whose run meets the SLO (mean TTFT and mean TPOT within it, nothing failed): its agents per second
(APS). Every probe starts cold (caches flushed, store emptied) and the prefills hold ``--kv-tokens`` of KV, far
fewer than the agents' contexts, so hits that outlive an agent's think time come from the store, as with the
paper's thousands of agents. One stack is served at a time (two sets of servers do not fit in memory).
"""

from __future__ import annotations

import asyncio
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
from rich.table import Table

from dualpath.cluster.local import LocalCluster
from dualpath.cluster.online import Load, LoadResult, Slo, capacity, run_load
from dualpath.traces import AgentTrace


@dataclass(frozen=True)
class ProbeSummary:
    agent_rate: float
    met: bool
    requests: int
    failed: int
    duration_s: float
    mean_ttft_s: float
    mean_tpot_s: float
    attainment: float
    node_read_bytes: dict[str, int]
    de_read_share: float
    store_share: float  # of the hit KV, the share the storage NICs read (the rest the servers' caches held)


@dataclass(frozen=True)
class StackCapacity:
    mode: str
    aps: float  # the highest probed rate that met the SLO; 0 when even the lowest missed it
    probes: list[ProbeSummary]


def summarise_probe(rate: float, result: LoadResult, slo: Slo, read: dict[str, int],
                    bytes_per_token: int) -> ProbeSummary:
    ok = [r for r in result.records if r.ok]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    total = sum(read.values())
    hit_bytes = sum(r.context_tokens for r in ok) * bytes_per_token
    return ProbeSummary(rate, slo.met(result.records), len(result.records), len(result.records) - len(ok),
                        result.duration_s, float(np.mean([r.ttft_s for r in ok])) if ok else float("nan"),
                        float(np.mean(tpots)) if tpots else float("nan"), slo.attainment(result.records), read,
                        sum(b for n, b in read.items() if n.startswith("de")) / total if total else 0.0,
                        total / hit_bytes if hit_bytes else 0.0)


def search_stack(cluster: LocalCluster, mode: str, pool: Sequence[AgentTrace], load: Load, slo: Slo,
                 low: float, high: float, resolution: float, seed: int, progress: object | None = None
                 ) -> StackCapacity:
    """``mode``'s APS on ``cluster``. Probe k of every stack runs agents of seed ``seed + k`` (its arrivals and
    token ids), so both stacks' first probes (``low``, ``high``) see the same load."""
    url = cluster.serve(mode)
    probes: list[ProbeSummary] = []

    def run_at(rate: float) -> LoadResult:
        cluster.reset()
        before = cluster.node_read_bytes()
        task = progress.add_task(f"{mode:>8} {rate:.3f}/s", total=load.num_prompts) if progress else None
        result = asyncio.run(run_load(url, pool, replace(load, agent_rate=rate), seed + len(probes),
                                      (lambda _: progress.advance(task)) if progress else None))
        after = cluster.node_read_bytes()
        probes.append(summarise_probe(rate, result, slo, {n: after[n] - before[n] for n in after},
                                      cluster.config.bytes_per_token))
        return result

    aps, _ = capacity(run_at, slo, low, high, resolution)
    return StackCapacity(mode, aps, probes)


def aps_bounds(found: float, resolution: float, high: float) -> tuple[float, float]:
    """Where the true APS lies given the search's answer: [found, found + resolution), unbounded above when even
    ``high`` met the SLO."""
    return (found, float("inf") if found >= high else found + resolution)


def ratio_bounds(base: StackCapacity, dual: StackCapacity, resolution: float, high: float
                 ) -> tuple[float, float] | None:
    """The APS ratio's range that the two searches' resolution leaves; None when the baseline met nothing."""
    (b_low, b_high), (d_low, d_high) = aps_bounds(base.aps, resolution, high), aps_bounds(dual.aps, resolution, high)
    if b_low <= 0:
        return None
    return d_low / b_high, d_high / b_low


def run_online_ab(cluster: LocalCluster, modes: Sequence[str], pool: Sequence[AgentTrace], load: Load, slo: Slo,
                  low: float, high: float, resolution: float, seed: int = 1,
                  progress: object | None = None) -> list[StackCapacity]:
    """Each of ``modes`` (baseline first) searched in turn on ``cluster`` (already started)."""
    try:
        return [search_stack(cluster, m, pool, load, slo, low, high, resolution, seed, progress) for m in modes]
    finally:
        cluster.stop_router()


def online_table(stacks: Sequence[StackCapacity], slo: Slo, resolution: float, high: float) -> Table:
    base, dual = stacks
    t = Table(title=f"online A/B: agents/s within the SLO (mean TTFT <= {slo.ttft_s:g} s, "
                    f"mean TPOT <= {slo.tpot_s * 1e3:g} ms)")
    for column in ("stack", "agents/s", "probe: rate/s -> mean TTFT s, TPOT ms, met; hit KV from the store, "
                                        "its DE share"):
        t.add_column(column)
    for s in stacks:
        low, top = aps_bounds(s.aps, resolution, high)
        probes = "\n".join(f"{p.agent_rate:.3f} -> {p.mean_ttft_s:.2f}, {p.mean_tpot_s * 1e3:.1f}, "
                           f"{'met' if p.met else 'missed'}{f', {p.failed} failed' if p.failed else ''}"
                           f"; {p.store_share:.0%}, {p.de_read_share:.0%}" for p in s.probes)
        t.add_row(s.mode, f"{s.aps:.3f} ({low:.3f}-{top:.3f})", probes)
    bounds = ratio_bounds(base, dual, resolution, high)
    ratio = f"{dual.aps / base.aps:.2f}x" if base.aps else "n/a (the baseline met the SLO at no probed rate)"
    t.add_row(f"{dual.mode} / {base.mode}", ratio + (f" ({bounds[0]:.2f}-{bounds[1]:.2f})" if bounds else ""), "")
    return t


def online_records(stacks: Sequence[StackCapacity], resolution: float, high: float, command: str,
                   target: str, baseline: str) -> list[dict]:
    """benchmark/results records: DualPath's APS against the baseline's, and the DE read share at each APS."""
    base, dual = stacks
    machine = f"{platform.node()} ({platform.machine()}, CPU-only, real SGLang 0.5.17 servers)"

    def at_aps(s: StackCapacity) -> ProbeSummary | None:
        return next((p for p in s.probes if p.met and p.agent_rate == s.aps), None)

    share = [p.de_read_share if (p := at_aps(s)) else None for s in stacks]
    bounds = ratio_bounds(base, dual, resolution, high)
    common = {"baseline": baseline, "command": command, "machine": machine, "date": date.today().isoformat()}
    return [{"metric": "agents_per_s_at_slo", "value": dual.aps, "unit": "agents/s", "baseline_value": base.aps,
             "ratio": dual.aps / base.aps if base.aps else None,
             "ratio_bounds": bounds and [b if math.isfinite(b) else None for b in bounds],  # None: unbounded (JSON)
             "target": target, **common},
            {"metric": "de_read_share_at_aps", "value": share[1], "unit": "fraction", "baseline_value": share[0],
             "ratio": None, "target": "", **common}]


def write_online(path: Path, stacks: Sequence[StackCapacity], records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    path.with_suffix(".runs.json").write_text(json.dumps([asdict(s) for s in stacks], indent=1) + "\n")


def plot_online(stacks: Sequence[StackCapacity], slo: Slo, path: Path) -> None:
    """Mean TTFT of every probe against its agent rate, per stack, with the SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, color in zip(stacks, ("#999", "#2a7"), strict=False):
        probes = sorted(s.probes, key=lambda p: p.agent_rate)
        ax.plot([p.agent_rate for p in probes], [p.mean_ttft_s for p in probes], "o-", color=color,
                label=f"{s.mode}: {s.aps:.3f} agents/s")
        if s.aps:
            ax.axvline(s.aps, color=color, ls=":", lw=1)
    ax.axhline(slo.ttft_s, color="#a22", ls="--", lw=1, label=f"SLO: mean TTFT {slo.ttft_s:g} s")
    ax.set_xlabel("agent arrival rate (agents/s)")
    ax.set_ylabel("mean TTFT (s)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
