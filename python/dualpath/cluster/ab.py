"""A/B of one trace on one local cluster: the stock read path (baseline) against DualPath.

Both runs replay the same trace shapes on the same servers, each starting cold (caches flushed, store
emptied), each with its own token ids so that neither finds the other's KV anywhere. Agents advance in
rounds with the servers' caches flushed in between, so every turn's context comes from the store — the
regime of agents that outnumber the GPUs' memory, where the storage NICs decide throughput. Only the router's
mode differs: ``baseline`` reads every hit on the prefill side, as the stock router does; ``dualpath``
lets the global scheduler pick the side per request (``split``: and split one request's reads between them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

from dualpath.bench.traces import AgentTrace
from dualpath.cluster.local import LocalCluster
from dualpath.cluster.replay import ReplayResult, replay
from dualpath.router.store_view import StoreView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    mode: str
    requests: int
    failed: int
    makespan_s: float
    tokens_per_s: float
    jct_p50_s: float
    jct_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    node_read_bytes: dict[str, int]
    nic_utilisation: dict[str, float]
    de_read_share: float
    first_error: str
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU time each node's server used during the run
    # Inter-token latency: every token interval of every measured request, pooled (TPOT's p50 is a median
    # of per-request means, 17 values in the default run; this one has ~15 samples per request).
    itl_p50_s: float = float("nan")
    itl_p99_s: float = float("nan")
    # Bytes each node had read since the run started, sampled every NicSampler.INTERVAL_S: (seconds, bytes).
    nic_timeline: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per measured request (RequestRecord fields)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def node_read_bytes(view: StoreView, nodes: Sequence[str]) -> dict[str, int]:
    return {node: view.read_queue(node).read_bytes for node in nodes}


class NicSampler:
    """Samples every node's read bytes in a thread while a run replays (the timeline of the A/B plot)."""

    INTERVAL_S = 0.5

    def __init__(self, view: StoreView, nodes: Sequence[str]) -> None:
        self.view, self.nodes = view, list(nodes)
        self.timeline: dict[str, list[tuple[float, int]]] = {n: [] for n in self.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nic-sampler", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        first = node_read_bytes(self.view, self.nodes)
        while True:
            now = node_read_bytes(self.view, self.nodes)
            for node in self.nodes:
                self.timeline[node].append((round(time.monotonic() - start, 3), now[node] - first[node]))
            if self._stop.wait(self.INTERVAL_S):
                return

    def __enter__(self) -> NicSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def summarise(mode: str, result: ReplayResult, read: dict[str, int], nic_bytes_per_s: float,
              nic_timeline: dict[str, list[tuple[float, int]]] | None = None,
              cpu_s: dict[str, float] | None = None) -> RunSummary:
    ok = [r for r in result.records if r.ok]
    tokens = sum(r.prompt_tokens - r.context_tokens + r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    intervals = [i for r in ok for i in r.token_intervals_s]
    total_read = sum(read.values()) or 1
    return RunSummary(
        mode, len(result.records), len(result.records) - len(ok), result.makespan_s,
        tokens / result.makespan_s, _pct(list(result.jct_s.values()), 50), _pct(list(result.jct_s.values()), 99),
        _pct([r.ttft_s for r in ok], 50), _pct([r.ttft_s for r in ok], 99), _pct(tpots, 50), _pct(tpots, 99),
        read, {n: b / (nic_bytes_per_s * result.makespan_s) for n, b in read.items()},
        sum(b for n, b in read.items() if n.startswith("de")) / total_read,
        next((r.error for r in result.records if not r.ok), ""), cpu_s or {},
        _pct(intervals, 50), _pct(intervals, 99), nic_timeline or {}, [asdict(r) for r in result.records],
    )


def run_ab(cluster: LocalCluster, agents: Sequence[AgentTrace], max_gen: int | None, scale: float = 1.0,
           progress: object | None = None, mode: str = "dualpath") -> list[RunSummary]:
    """Replay ``agents`` on ``cluster`` (already started) in baseline mode, then in ``mode``; one summary each."""
    nodes = [s.node for s in cluster.config.specs()]
    total = sum(len(a.turns) - 1 for a in agents)  # the first round warms up
    summaries = []
    view = StoreView(cluster.config.store_root)  # read-only: the nodes' state files, mapped once for both runs
    try:
        for seed, run_mode in enumerate(("baseline", mode)):
            cluster.reset()
            cluster.route(run_mode)
            before, cpu_before = node_read_bytes(view, nodes), cluster.cpu_seconds()
            task = progress.add_task(f"{run_mode:>8}", total=total) if progress is not None else None

            def advance(_record: object, task: object = task) -> None:
                if progress is not None:
                    progress.advance(task)

            def between_rounds(prompts: list[list[int]]) -> None:
                if not cluster.wait_stored(prompts):
                    log.warning("the decode did not write a round's prompts back within the timeout")
                cluster.flush()

            with NicSampler(view, nodes) as sampler:
                result = asyncio.run(replay(cluster.url, agents, seed=seed + 1, max_gen=max_gen, scale=scale,
                                            between_rounds=between_rounds, on_record=advance))
            after, cpu_after = node_read_bytes(view, nodes), cluster.cpu_seconds()
            read = {n: after[n] - before[n] for n in nodes}
            cpu = {n: cpu_after[n] - cpu_before[n] for n in cpu_after}
            summaries.append(summarise(run_mode, result, read, cluster.config.nic_gbps * 1e9 / 8,
                                       sampler.timeline, cpu))
    finally:
        view.close()
    cluster.stop_router()
    return summaries


def result_records(summaries: Sequence[RunSummary], command: str, target: dict[str, str]) -> list[dict]:
    """benchmark/results records: DualPath's value against the baseline's, measured in the same run."""
    base, dual = summaries
    machine = f"{platform.node()} ({platform.machine()}, CPU-only, real SGLang 0.5.17 servers)"
    rows = [("throughput", "tokens/s", base.tokens_per_s, dual.tokens_per_s),
            ("jct_p50", "s", base.jct_p50_s, dual.jct_p50_s),
            ("ttft_p50", "s", base.ttft_p50_s, dual.ttft_p50_s), ("ttft_p99", "s", base.ttft_p99_s, dual.ttft_p99_s),
            ("tpot_p50", "s", base.tpot_p50_s, dual.tpot_p50_s), ("tpot_p99", "s", base.tpot_p99_s, dual.tpot_p99_s),
            ("itl_p50", "s", base.itl_p50_s, dual.itl_p50_s), ("itl_p99", "s", base.itl_p99_s, dual.itl_p99_s),
            ("de_read_share", "fraction", base.de_read_share, dual.de_read_share)]
    return [{"metric": metric, "value": d, "unit": unit, "baseline": "baseline (PE-side reads)",
             "baseline_value": b, "ratio": d / b if b else None, "target": target.get(metric, ""),
             "command": command, "machine": machine, "date": date.today().isoformat()}
            for metric, unit, b, d in rows]


def write_json(path: Path, summaries: Sequence[RunSummary], records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    (path.with_suffix(".runs.json")).write_text(json.dumps([s.__dict__ for s in summaries], indent=1) + "\n")


def estimate_minutes(agents: Sequence[AgentTrace], bytes_per_token: int, nic_gbps: float, prefill: int,
                     scale: float) -> float:
    """Rough wall time of both runs: every hit read through the PE NICs (they are busy ~90% of a baseline
    run on a 2-core CPU), a warm-up round each, and starting the servers (measured, 2 cores)."""
    hit_bytes = sum(t.context_tokens for a in agents for t in a.turns) * bytes_per_token * scale
    per_run = 1.1 * hit_bytes / (nic_gbps * 1e9 / 8) / prefill + 60
    return (100 + 2 * per_run) / 60


def clock() -> str:
    return time.strftime("%H:%M:%S")
