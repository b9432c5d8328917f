"""A/B of one trace on one local cluster: the stock read path (baseline) against DualPath.

Both replays run the same trace shapes on the same servers, each with its own token ids so that neither
finds the other's KV anywhere. Agents advance in rounds with the servers' caches flushed in between, so
every turn's context comes from the store — the regime of agents that outnumber the GPUs' memory, where
the storage NICs decide throughput. The baseline reads every hit on the prefill side: the stock stack
(``stock``: sglang_router over stock SGLang servers with the block store as their HiCache backend), the stock
router over DualPath's servers (``stock-router``) or ours in ``baseline`` mode; ``dualpath`` lets the global
scheduler pick the side per request (``split``: and split one request's reads between them).

The two replays take turns (:func:`schedule`). A shared 2-core machine drifts by +-20% in decode speed over
minutes; run one replay after the other and that drift lands on one side of the ratio. On one set of servers
the modes alternate round by round through two routers side by side; the stock stack's servers replace
DualPath's (memory holds one set), so the baseline's rounds come in two halves around DualPath's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path

import aiohttp
import numpy as np

from dualpath.cluster.local import STOCK, STOCK_ROUTER, LocalCluster
from dualpath.cluster.replay import (
    TOP_LOGPROBS,
    Replay,
    ReplayResult,
    Streamed,
    TopLogprobs,
    same_logprobs,
    stream_generate,
)
from dualpath.traces import AgentTrace

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
    # of per-request means, one value per request; this one has ~15 samples per request).
    itl_p50_s: float = float("nan")
    itl_p99_s: float = float("nan")
    # Bytes each node had read since the run started, sampled every NicSampler.INTERVAL_S: (seconds, bytes).
    nic_timeline: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # one per measured request (RequestRecord fields)
    round_s: list[float] = field(default_factory=list)  # each measured round's wall time
    # This mode's last answers, asked again through the other mode's router: how many, and those that differed.
    outputs_checked: int = 0
    outputs_differing: list[str] = field(default_factory=list)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


class NicSampler:
    """Samples every node's read bytes in a thread while a round replays (the timeline of the A/B plot)."""

    INTERVAL_S = 0.5

    def __init__(self, cluster: LocalCluster, nodes: Sequence[str]) -> None:
        self.cluster, self.nodes = cluster, list(nodes)
        self.timeline: dict[str, list[tuple[float, int]]] = {n: [] for n in self.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nic-sampler", daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        first = self.cluster.node_read_bytes()
        while True:
            now = self.cluster.node_read_bytes()
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
        list(result.round_s),
    )


class ModeMeter:
    """What one mode's measured rounds used: read bytes per node, CPU seconds per node's server, and the NIC
    timeline on the mode's own clock (its measured rounds back to back)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.nodes = cluster.config.nodes
        self.read = dict.fromkeys(self.nodes, 0)
        self.cpu_s = dict.fromkeys(self.nodes, 0.0)
        self.timeline: dict[str, list[tuple[float, int]]] = {n: [] for n in self.nodes}
        self._elapsed = 0.0

    @contextmanager
    def round(self) -> Iterator[None]:
        read, cpu, started = self.cluster.node_read_bytes(), self.cluster.cpu_seconds(), time.monotonic()
        with NicSampler(self.cluster, self.nodes) as sampler:
            yield
        after, cpu_after = self.cluster.node_read_bytes(), self.cluster.cpu_seconds()
        for node in self.nodes:
            self.timeline[node] += [(round(self._elapsed + t, 3), self.read[node] + b)
                                    for t, b in sampler.timeline[node]]
            self.read[node] += after[node] - read[node]
            self.cpu_s[node] += cpu_after[node] - cpu[node]
        self._elapsed += time.monotonic() - started


def run_ab(cluster: LocalCluster, agents: Sequence[AgentTrace], max_gen: int | None, scale: float = 1.0,
           progress: object | None = None, mode: str = "dualpath", baseline: str = "baseline") -> list[RunSummary]:
    """Replay ``agents`` on ``cluster`` (already started) through a ``baseline`` router (ours in baseline mode,
    ``stock-router``, or ``stock``: the stock stack) and a ``mode`` router, taking turns round by round; one summary
    each, baseline first."""
    if baseline == mode:
        raise ValueError(f"the A and B runs need two routers; both are {mode!r}")
    modes = (baseline, mode)
    cluster.reset()
    try:
        replays = {m: Replay("", agents, seed=i + 1, max_gen=max_gen, scale=scale) for i, m in enumerate(modes)}
        meters = {m: ModeMeter(cluster) for m in modes}
        steps = schedule(modes, replays[mode].rounds, one_set_at_a_time=cluster.config.servers == "both")
        asyncio.run(_take_turns(cluster, replays, meters, steps, progress))
        checks = asyncio.run(cross_check(cluster, replays))
    finally:
        cluster.stop_router()
    rate = cluster.config.nic_gbps * 1e9 / 8
    return [replace(summarise(m, replays[m].result(), meters[m].read, rate, meters[m].timeline, meters[m].cpu_s),
                    outputs_checked=checks[m][0], outputs_differing=checks[m][1]) for m in modes]


def schedule(modes: Sequence[str], rounds: int, one_set_at_a_time: bool = False) -> list[tuple[str, int]]:
    """The order of the A/B's (mode, round) steps. Both modes' routers up: they take turns round by round, which
    one goes first alternating. One set of servers at a time (each swap restarts them, ~1 min): A's first half,
    all of B, A's second half, so that a drift linear in time weighs on both alike."""
    first, second = modes
    if not one_set_at_a_time:
        return [(m, index) for index in range(rounds) for m in (modes if index % 2 == 0 else modes[::-1])]
    half = rounds // 2
    return ([(first, i) for i in range(half)] + [(second, i) for i in range(rounds)]
            + [(first, i) for i in range(half, rounds)])


async def cross_check(cluster: LocalCluster, replays: dict[str, Replay]) -> dict[str, tuple[int, list[str]]]:
    """Every agent's last request of each mode, sent again through the other mode's router once every cache is
    flushed (so its hit, all but its last page, is read from the store on the other mode's path): its top-k
    logprobs must equal what the mode got. Per mode: how many were asked again, and what differed."""
    first, second = replays
    # Through the mode being served first: one set of servers at a time, that saves a swap.
    order = sorted(((first, second), (second, first)), key=lambda pair: not cluster.serving(pair[1]))
    checks = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for mine, other in order:
            url = await asyncio.to_thread(cluster.serve, other)
            await asyncio.to_thread(cluster.flush)
            pairs = replays[mine].last_turns()
            again = await asyncio.gather(*(stream_generate(session, url, prompt, record.output_tokens,
                                                     replays[other].timeout_s, TOP_LOGPROBS)
                                           for prompt, record in pairs), return_exceptions=True)
            differing = [f"{record.agent_id} turn {record.turn} through the {other} router: {why}"
                         for (_, record), answer in zip(pairs, again, strict=True)
                         if (why := _difference(record.top_logprobs, answer))]
            checks[mine] = (len(pairs), differing)
    return checks


def _difference(got: TopLogprobs, again: Streamed | BaseException) -> str:
    """Why an answer asked again differs from the first ('' when it does not)."""
    if isinstance(again, BaseException):
        return f"{type(again).__name__}: {again}"
    if not got or not again.top_logprobs:
        return "no logprobs in the answer"
    if not same_logprobs(got, again.top_logprobs):
        return f"top-{TOP_LOGPROBS} logprobs differ"
    return ""


async def _take_turns(cluster: LocalCluster, replays: dict[str, Replay], meters: dict[str, ModeMeter],
                      steps: Sequence[tuple[str, int]], progress: object | None) -> None:
    tasks = {m: progress.add_task(f"{m:>8}", total=r.measured_requests) for m, r in replays.items()} if progress else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for m, index in steps:
            replays[m].url = await asyncio.to_thread(cluster.serve, m)
            measured = replays[m].measured(index)
            with meters[m].round() if measured else nullcontext():
                records, prompts = await replays[m].round(session, index)
            if measured and progress is not None:
                progress.advance(tasks[m], len(records))
            await asyncio.to_thread(_settle, cluster, prompts)


def _settle(cluster: LocalCluster, prompts: list[list[int]]) -> None:
    """Between rounds: wait until the decodes wrote the round's prompts back, then flush every cache, so the
    next round finds its contexts in the store only."""
    if not cluster.wait_stored(prompts):
        log.warning("the decode did not write a round's prompts back within the timeout")
    cluster.flush()


BOOTSTRAP_DRAWS = 2000


def ratio_interval(statistic: Callable[[np.ndarray], float], base: Sequence, dual: Sequence, paired: bool = False,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of ``statistic(dual) / statistic(base)``: both samples redrawn with
    replacement (``paired``: the same draw for both, for samples matched one to one, such as the rounds the two
    modes took turns in); None with fewer than two samples a side."""
    base, dual = np.asarray(base, dtype=float), np.asarray(dual, dtype=float)
    if len(base) < 2 or len(dual) < 2 or (paired and len(base) != len(dual)):
        return None
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(draws):
        drawn = rng.integers(len(base), size=len(base))
        denominator = statistic(base[drawn])
        if denominator:
            ratios.append(statistic(dual[drawn if paired else rng.integers(len(dual), size=len(dual))]) / denominator)
    if not ratios:
        return None
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _rounds(summary: RunSummary) -> np.ndarray:
    """(new + output tokens, seconds) of each measured round."""
    tokens: dict[int, int] = {}
    for r in summary.records:
        if r["ok"]:
            tokens[r["turn"]] = tokens.get(r["turn"], 0) + r["prompt_tokens"] - r["context_tokens"] + r["output_tokens"]
    turns = sorted({r["turn"] for r in summary.records})
    return np.array([(tokens.get(turn, 0), seconds) for turn, seconds in zip(turns, summary.round_s, strict=True)])


def _samples(summary: RunSummary, metric: str) -> list[float]:
    ok = [r for r in summary.records if r["ok"]]
    if metric == "jct":  # an agent's measured turns, end to end
        jct: dict[str, float] = {}
        for r in ok:
            jct[r["agent_id"]] = jct.get(r["agent_id"], 0.0) + r["e2e_s"]
        return list(jct.values())
    if metric == "ttft":
        return [r["ttft_s"] for r in ok]
    if metric == "tpot":
        return [(r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    return [i for r in ok for i in r["token_intervals_s"]]  # itl


def ratio_intervals(base: RunSummary, dual: RunSummary) -> dict[str, tuple[float, float] | None]:
    """Each A/B ratio's bootstrap interval: throughput over the rounds (paired: the modes took turns round by
    round), latencies over the requests (JCT: the agents; ITL: every token interval)."""
    intervals = {"throughput": ratio_interval(lambda rows: rows[:, 0].sum() / rows[:, 1].sum(), _rounds(base),
                                              _rounds(dual), paired=True)}
    for metric in ("jct", "ttft", "tpot", "itl"):
        for q in (50, 99):
            intervals[f"{metric}_p{q}"] = ratio_interval(lambda values, q=q: float(np.percentile(values, q)),
                                                         _samples(base, metric), _samples(dual, metric))
    return intervals


def describe(mode: str) -> str:
    """A baseline mode, as the results records name it."""
    return {"baseline": "DualPath router in baseline mode (PE-side reads)",
            STOCK_ROUTER: "stock sglang_router 0.3.2 over DualPath's servers (PE-side reads)",
            STOCK: "stock sglang_router 0.3.2 over stock SGLang servers, block store as HiCache backend"
            }.get(mode, mode)


def result_records(summaries: Sequence[RunSummary], command: str, target: dict[str, str]) -> list[dict]:
    """benchmark/results records: DualPath's value against the baseline's, measured in the same run, each ratio
    with its bootstrap 95% interval (``ratio_ci95``)."""
    base, dual = summaries
    machine = f"{platform.node()} ({platform.machine()}, CPU-only, real SGLang 0.5.17 servers)"
    intervals = ratio_intervals(base, dual)
    rows = [("throughput", "tokens/s", base.tokens_per_s, dual.tokens_per_s),
            ("jct_p50", "s", base.jct_p50_s, dual.jct_p50_s),
            ("ttft_p50", "s", base.ttft_p50_s, dual.ttft_p50_s), ("ttft_p99", "s", base.ttft_p99_s, dual.ttft_p99_s),
            ("tpot_p50", "s", base.tpot_p50_s, dual.tpot_p50_s), ("tpot_p99", "s", base.tpot_p99_s, dual.tpot_p99_s),
            ("itl_p50", "s", base.itl_p50_s, dual.itl_p50_s), ("itl_p99", "s", base.itl_p99_s, dual.itl_p99_s),
            ("de_read_share", "fraction", base.de_read_share, dual.de_read_share)]
    baseline = describe(base.mode)
    return [{"metric": metric, "value": d, "unit": unit, "baseline": baseline,
             "baseline_value": b, "ratio": d / b if b else None, "ratio_ci95": intervals.get(metric),
             "target": target.get(metric, ""), "command": command, "machine": machine,
             "date": date.today().isoformat()}
            for metric, unit, b, d in rows]


def write_json(path: Path, summaries: Sequence[RunSummary], records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    (path.with_suffix(".runs.json")).write_text(json.dumps([s.__dict__ for s in summaries], indent=1) + "\n")


SWAPS = 3  # server-set swaps of an A/B against the stock stack: to DualPath's, back, and for the output check


def estimate_minutes(agents: Sequence[AgentTrace], bytes_per_token: int, nic_gbps: float, prefill: int,
                     scale: float, swaps: int = 0) -> float:
    """Rough wall time of both runs: every hit read through the PE NICs (they are busy ~90% of a baseline
    run on a 2-core CPU), a warm-up round each, and starting the servers, once and at each swap of server sets
    (measured, 2 cores)."""
    hit_bytes = sum(t.context_tokens for a in agents for t in a.turns) * bytes_per_token * scale
    per_run = 1.1 * hit_bytes / (nic_gbps * 1e9 / 8) / prefill + 60
    return (100 * (1 + swaps) + 2 * per_run) / 60


def clock() -> str:
    return time.strftime("%H:%M:%S")
