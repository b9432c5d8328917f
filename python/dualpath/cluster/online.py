"""Agents as a serving benchmark sees them: sessions run turn by turn against any PD front door.

Each agent sends its turns in order; a turn's prompt is its conversation so far plus new ids (``replay.AgentHistory``),
so the hit KV is really the agent's own. How the load arrives follows SGLang's benchmarks:

- closed loop (``bench_multiturn``): ``clients`` agents run side by side, the next one starting when one ends;
- online (the paper's Figure 10): agents arrive by a Poisson process at ``agent_rate`` agents/s;
- either way, an agent waits its trace's think time (x ``think_scale``) before each turn after the first, turns
  are released at most at ``request_rate`` (Poisson; inf: at once) and at most ``max_concurrency`` are in flight.

The run stops sending after ``num_prompts`` turns and waits for every answer. ``capacity`` searches the highest
agent rate whose run meets the SLO (the paper's APS).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import aiohttp
import numpy as np

from dualpath.cluster.replay import AgentHistory, RequestRecord, run_turn
from dualpath.traces import AgentTrace, load_claude_code, load_mooncake, mooncake_sessions

DATASETS = ("claude-code", "mooncake")


@dataclass(frozen=True)
class Load:
    num_prompts: int
    request_rate: float = math.inf
    max_concurrency: int | None = None
    agent_rate: float | None = None  # None: closed loop
    clients: int = 8
    think_scale: float = 0.0
    max_gen: int | None = None
    scale: float = 1.0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.request_rate <= 0 or (self.agent_rate is not None and self.agent_rate <= 0):
            raise ValueError(f"rates must be positive, got --request-rate {self.request_rate}, "
                             f"--agent-rate {self.agent_rate}")
        if (self.max_concurrency is not None and self.max_concurrency < 1) or self.clients < 1:
            raise ValueError(f"--max-concurrency and --num-clients must be >= 1, got {self.max_concurrency}, "
                             f"{self.clients}")
        if self.think_scale < 0 or self.scale <= 0:
            raise ValueError(f"--think-time-scale must be >= 0 and --scale > 0, got {self.think_scale}, {self.scale}")


class LoadResult(NamedTuple):
    records: list[RequestRecord]
    duration_s: float
    agents: int
    max_in_flight: int


def agent_pool(dataset: str, path: Path | None, scale: float, max_context: int,
               turns: int | None = None) -> list[AgentTrace]:
    """The dataset's agents (Mooncake's requests grouped into sessions by shared prefixes), each cut to its
    first ``turns``, whose scaled prompts fit ``max_context``; those with the most turns first."""
    if dataset == "mooncake":
        agents = mooncake_sessions(load_mooncake(path) if path else load_mooncake())
    elif dataset == "claude-code":
        agents = load_claude_code(path) if path else load_claude_code()
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    cut = [replace(a, turns=a.turns[:turns]) for a in agents]
    fitting = [a for a in cut if a.turns and max(t.prompt_tokens for t in a.turns) * scale <= max_context]
    if not fitting:
        raise ValueError(f"no agent of the {dataset} trace fits --max-context {max_context} at --scale {scale}")
    return sorted(fitting, key=lambda a: -len(a.turns))


def agents_for(pool: Sequence[AgentTrace], num_prompts: int, at_least: int = 1) -> list[AgentTrace]:
    """At least ``at_least`` agents whose turns cover ``num_prompts``: the pool in order, then copies of it
    (``<id>#2``, ...), which get token ids of their own."""
    if not pool or not any(a.turns for a in pool):
        raise ValueError("the dataset has no agent with a turn")
    chosen: list[AgentTrace] = []
    turns, copy = 0, 1
    while turns < num_prompts or len(chosen) < at_least:
        for agent in pool:
            if turns >= num_prompts and len(chosen) >= at_least:
                break
            chosen.append(agent if copy == 1 else replace(agent, agent_id=f"{agent.agent_id}#{copy}"))
            turns += len(agent.turns)
        copy += 1
    return chosen


class _Pacer:
    """Releases turns at a Poisson rate (inf: at once), one at a time in the order they asked."""

    def __init__(self, rate: float, rng: random.Random) -> None:
        self.rate, self.rng = rate, rng
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if math.isinf(self.rate):
            return
        async with self._lock:
            now = time.perf_counter()
            self._next = max(self._next, now) + self.rng.expovariate(self.rate)
            await asyncio.sleep(self._next - now)


async def run_load(url: str, pool: Sequence[AgentTrace], load: Load, seed: int = 0,
                   on_done: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Run ``load`` against ``url`` (a router or server serving ``/generate``); every request's record."""
    rng = random.Random(seed)
    blocks: dict[int, list[int]] = {}
    traces = agents_for(pool, load.num_prompts, load.clients if load.agent_rate is None else 1)
    agents = [AgentHistory(trace, seed, load.scale, blocks) for trace in traces]
    slots = asyncio.Semaphore(load.max_concurrency or len(agents) * max(len(a.trace.turns) for a in agents))
    pacer = _Pacer(load.request_rate, rng)
    records: list[RequestRecord] = []
    sent = in_flight = max_in_flight = 0
    t0 = time.perf_counter()

    async def run_agent(agent: AgentHistory, arrival_s: float, session: aiohttp.ClientSession) -> None:
        nonlocal sent, in_flight, max_in_flight
        await asyncio.sleep(arrival_s)
        for index, turn in enumerate(agent.trace.turns):
            if index:
                await asyncio.sleep(turn.think_s * load.think_scale)
            async with slots:
                await pacer.wait()
                if sent >= load.num_prompts:
                    return
                sent += 1
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                record = await run_turn(session, url, agent, index, load.max_gen, load.timeout_s, t0)
                in_flight -= 1
            records.append(record)
            if on_done is not None:
                on_done(record)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        if load.agent_rate is None:
            waiting = deque(agents)

            async def client() -> None:
                while waiting and sent < load.num_prompts:
                    await run_agent(waiting.popleft(), 0.0, session)

            await asyncio.gather(*(client() for _ in range(min(load.clients, len(agents)))))
        else:
            arrivals = np.cumsum([rng.expovariate(load.agent_rate) for _ in agents]).tolist()
            await asyncio.gather(*(run_agent(a, at, session) for a, at in zip(agents, arrivals, strict=True)))
    used = sum(1 for a in agents if a.last_prompt)
    return LoadResult(records, time.perf_counter() - t0, used, max_in_flight)


@dataclass(frozen=True)
class Slo:
    """The paper's SLO (section 7.4: TTFT <= 4 s, TPOT <= 50 ms), met by a run whose mean TTFT and mean TPOT
    are within it and none of whose requests failed; attainment is the share of requests within both."""

    ttft_s: float = 4.0
    tpot_s: float = 0.05

    def attainment(self, records: Sequence[RequestRecord]) -> float:
        if not records:
            return 0.0
        return sum(r.ok and r.ttft_s <= self.ttft_s and (r.tpot_s or 0.0) <= self.tpot_s
                   for r in records) / len(records)

    def met(self, records: Sequence[RequestRecord]) -> bool:
        ok = [r for r in records if r.ok]
        if not ok or len(ok) < len(records):
            return False
        tpots = [t for r in ok if (t := r.tpot_s) is not None]
        return (float(np.mean([r.ttft_s for r in ok])) <= self.ttft_s
                and (not tpots or float(np.mean(tpots)) <= self.tpot_s))


class Probe(NamedTuple):
    agent_rate: float
    met: bool
    result: LoadResult


def capacity(run_at: Callable[[float], LoadResult], slo: Slo, low: float, high: float,
             resolution: float) -> tuple[float, list[Probe]]:
    """The highest agent rate in [low, high] whose run meets ``slo``, to within ``resolution`` agents/s, by
    bisection (0 when even ``low`` misses it); every probe, in the order run."""
    if not 0 < low < high or resolution <= 0:
        raise ValueError(f"need 0 < low < high and resolution > 0, got {low}, {high}, {resolution}")
    probes = []

    def probe(rate: float) -> bool:
        result = run_at(rate)
        probes.append(Probe(rate, slo.met(result.records), result))
        return probes[-1].met

    if not probe(low):
        return 0.0, probes
    if probe(high):
        return high, probes
    while high - low > resolution:
        middle = (low + high) / 2
        low, high = (middle, high) if probe(middle) else (low, middle)
    return low, probes
