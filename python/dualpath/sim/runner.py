"""Offline (JCT) and online (capacity at SLO) experiments on a simulated cluster.

Agents replay their turns in order: turn i+1 is sent `think_s` after turn i's last token. The hit length of
every turn comes from the trace record (client-computed, as in the paper), so no cache state is simulated.
"""

from __future__ import annotations

import gc
import statistics
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simpy

from dualpath.scheduler import Request
from dualpath.sim.cluster import Cluster, ClusterSpec, Job
from dualpath.traces import AgentTrace

Progress = Callable[[float], None]


@dataclass
class RunResult:
    """What one simulated run measured; latencies in seconds."""

    mode: str
    setting: str
    agents: int
    requests: int
    finished: int
    makespan_s: float
    mean_ttft_s: float
    p99_ttft_s: float
    mean_tpot_s: float
    prompt_tokens_per_s: float
    snic_max_over_avg: float
    wall_s: float
    median_decision_us: float = 0.0
    mean_trajectory_jct_s: float = 0.0  # online: agents in the system / arrival rate over the measured stretch


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """A run allocates millions of short-lived objects (events, closures, requests) next to ~0.5 M long-lived
    ones (trajectories, jobs in flight). CPython's cyclic collector, triggered by the allocations, re-scans
    the long-lived ones again and again (about 40% of the CPU time at 1,152 GPUs) and finds nothing: the
    simulator creates no reference cycles per request (test_sim checks it), so reference counting frees
    everything and pausing the collector for the run costs no memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Agent:
    """An agent replaying its trajectory: one object per agent, its bound methods serve as the callbacks of
    all its turns (no closure per request)."""

    __slots__ = ("next_turn", "replay", "trace")

    def __init__(self, replay: _Replay, trace: AgentTrace) -> None:
        self.replay, self.trace, self.next_turn = replay, trace, 0

    def send(self, _event: object = None) -> None:
        self.replay.send(self)

    def turn_done(self, job: Job) -> None:
        self.replay.turn_done(self, job)


class _Replay:
    """Drives agents through a cluster and collects per-request latencies (as arrays of doubles: millions
    of float objects kept to the end would only grow the heap the simulation works in)."""

    def __init__(self, cluster: Cluster, measure_from: float = 0.0) -> None:
        self.cluster = cluster
        self.env = cluster.env
        self.measure_from = measure_from
        self.next_id = 0
        self.submitted = self.finished = 0
        self.prompt_tokens = 0
        self.ttft = array("d")
        self.tpot = array("d")
        self.last_finish = 0.0
        self.active = 0  # agents between their first turn's arrival and their last turn's end
        self.agent_seconds = 0.0  # the integral of `active` over the measured stretch
        self._counted_to = measure_from

    def start(self, trace: AgentTrace, at: float) -> None:
        self.env.timeout(max(at - self.env.now, 0.0)).callbacks.append(_Agent(self, trace).send)

    def count_active(self, change: int = 0) -> None:
        """Add ``active`` since the last change to ``agent_seconds``, then apply ``change``."""
        now = self.env.now
        if now > self._counted_to:
            self.agent_seconds += self.active * (now - self._counted_to)
            self._counted_to = now
        self.active += change

    def send(self, agent: _Agent) -> None:
        if agent.next_turn == 0:
            self.count_active(+1)
        turn = agent.trace.turns[agent.next_turn]
        request = Request(self.next_id, turn.context_tokens, turn.append_tokens, turn.gen_tokens)
        self.next_id += 1
        self.submitted += 1
        self.cluster.submit(request, agent.turn_done)

    def turn_done(self, agent: _Agent, job: Job) -> None:
        self.finished += 1
        self.last_finish = job.finish
        self.prompt_tokens += job.request.total_tokens
        if job.arrival >= self.measure_from:
            self.ttft.append(job.first_token - job.arrival)
            self.tpot.append(job.tpot)
        agent.next_turn += 1
        if agent.next_turn == len(agent.trace.turns):
            self.count_active(-1)
            return
        think = agent.trace.turns[agent.next_turn].think_s
        if think > 0:
            self.env.timeout(think).callbacks.append(agent.send)
        else:
            self.send(agent)

    def stuck_waits(self) -> list[float]:
        """Requests measured but not yet answered count with the wait so far (a lower bound on their TTFT)."""
        now = self.env.now
        return [now - job.arrival for job in self.cluster.jobs.values()
                if job.arrival >= self.measure_from and job.first_token == 0.0]


def _summarise(cluster: Cluster, replay: _Replay, setting: str, agents: int, wall: float, horizon: float,
               ttft: Sequence[float], trajectory_jct_s: float = 0.0) -> RunResult:
    decisions = [a + b for a, b in zip(sorted(cluster.prefill_decision_s), sorted(cluster.decode_decision_s),
                                       strict=False)]
    return RunResult(
        mode=cluster.spec.mode.name, setting=setting, agents=agents, requests=replay.submitted,
        finished=replay.finished, makespan_s=replay.last_finish,
        mean_ttft_s=statistics.fmean(ttft) if ttft else 0.0,
        p99_ttft_s=float(np.percentile(ttft, 99)) if ttft else 0.0,
        mean_tpot_s=statistics.fmean(replay.tpot) if replay.tpot else 0.0,
        prompt_tokens_per_s=replay.prompt_tokens / horizon if horizon > 0 else 0.0,
        # The loaded first half: later, the tail of straggling agents leaves most NICs idle.
        snic_max_over_avg=cluster.snic_max_over_avg(0.0, horizon / 2), wall_s=wall,
        median_decision_us=statistics.median(decisions) * 1e6 if decisions else 0.0,
        mean_trajectory_jct_s=trajectory_jct_s,
    )


def run_offline(spec: ClusterSpec, agents: Sequence[AgentTrace], setting: str = "",
                progress: Progress | None = None, time_decisions: bool = False) -> RunResult:
    """All agents start at their `arrival_s` (0 for the synthetic sets); JCT is when the last one finishes."""
    if not agents:
        raise ValueError("run_offline needs at least one agent")
    wall = time.perf_counter()
    cluster = Cluster(spec)
    if time_decisions:
        cluster.timer = time.perf_counter
    replay = _Replay(cluster)
    total = sum(len(a.turns) for a in agents)
    env = cluster.env
    done = env.event()
    original = replay.turn_done

    def finish_hook(agent: _Agent, job: Job) -> None:
        original(agent, job)
        if replay.finished == total and not done.triggered:
            done.succeed()

    replay.turn_done = finish_hook  # type: ignore[method-assign]
    for agent in agents:
        replay.start(agent, agent.arrival_s)
    if progress is not None:
        def tick() -> simpy.events.Event:
            while not done.triggered:
                progress(env.now)
                yield env.timeout(60.0)
        env.process(tick())
    with _cyclic_gc_paused():
        env.run(until=done)
    return _summarise(cluster, replay, setting, len(agents), time.perf_counter() - wall, replay.last_finish,
                      replay.ttft)


@dataclass(frozen=True)
class RoundsResult:
    """A round-by-round replay: each round's wall time, and each request's TTFT in round order."""

    round_s: tuple[float, ...]
    ttft_s: tuple[float, ...]

    @property
    def makespan_s(self) -> float:
        return sum(self.round_s)


def run_rounds(spec: ClusterSpec, rounds: Sequence[Sequence[Request]]) -> RoundsResult:
    """Send each round's requests together and the next round once every one is answered, as ``dualpath ab``
    replays its agents (turn i of every agent is round i). Request ids must be unique across rounds."""
    cluster = Cluster(spec)
    env = cluster.env
    round_s: list[float] = []
    ttft: list[float] = []

    def replay() -> Iterator[simpy.Event]:
        for requests in rounds:
            start, answered, left = env.now, env.event(), [len(requests)]

            def done(job: Job, answered: simpy.Event = answered, left: list[int] = left) -> None:
                ttft.append(job.first_token - job.arrival)
                left[0] -= 1
                if not left[0]:
                    answered.succeed()

            for request in requests:
                cluster.submit(request, done)
            if requests:
                yield answered
            round_s.append(env.now - start)

    with _cyclic_gc_paused():
        env.run(until=env.process(replay()))
    return RoundsResult(tuple(round_s), tuple(ttft))


def run_online(spec: ClusterSpec, pool: Sequence[AgentTrace], aps: float, duration_s: float,
               warmup_s: float, setting: str = "", seed: int = 0) -> RunResult:
    """Poisson agent arrivals at `aps` agents/s for `duration_s`, each replaying a trajectory drawn from
    `pool`; latencies of requests sent after `warmup_s`, unanswered ones counted with their wait so far."""
    if aps <= 0 or not pool or not 0 <= warmup_s < duration_s:
        raise ValueError(f"need aps > 0, a non-empty pool and 0 <= warmup < duration; got {aps}, {warmup_s}")
    wall = time.perf_counter()
    cluster = Cluster(spec)
    replay = _Replay(cluster, measure_from=warmup_s)
    rng = np.random.default_rng(seed)
    at, started = 0.0, 0
    while True:
        at += rng.exponential(1.0 / aps)
        if at >= duration_s:
            break
        replay.start(pool[int(rng.integers(len(pool)))], at)
        started += 1
    with _cyclic_gc_paused():
        cluster.env.run(until=duration_s)
    ttft = [*replay.ttft, *replay.stuck_waits()]
    # Little's law: agents in the system = arrival rate x trajectory JCT, in a steady state. Unlike averaging the
    # agents that finished in the run, it does not leave out the trajectories longer than what is left of it.
    replay.count_active()
    trajectory_jct = replay.agent_seconds / (duration_s - warmup_s) / aps
    return _summarise(cluster, replay, setting, started, time.perf_counter() - wall, duration_s, ttft, trajectory_jct)


def meets_slo(result: RunResult, ttft_s: float = 4.0, tpot_s: float = 0.05) -> bool:
    return 0 < result.mean_ttft_s <= ttft_s and result.mean_tpot_s <= tpot_s


def capacity_at_slo(
    run: Callable[[float], RunResult], low: float, high: float, steps: int = 6
) -> tuple[float, list[RunResult]]:
    """Largest agents/s meeting the SLO, by geometric bisection between `low` (assumed to pass) and `high`."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    tried = []
    best = 0.0
    for _ in range(steps):
        mid = (low * high) ** 0.5
        result = run(mid)
        tried.append(result)
        if meets_slo(result):
            best, low = mid, mid
        else:
            high = mid
    return best, tried
