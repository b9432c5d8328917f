"""Replay agent traces against a PD front door (the DualPath router, or any SGLang-router-compatible one).

Agents run side by side, each turn after its previous one. A turn's prompt is the first
``context_tokens`` of the agent's history (its previous prompts and the ids the server generated) plus
``append_tokens`` fresh ids, so the KV of the context really exists when the turn arrives, as in the
agent session the trace recorded. A trace with content ids (Mooncake's ``hash_ids``) builds each prompt
from its blocks instead, one fixed run of ids per content id, so requests share exactly the prefixes the
trace says they share, across agents too. Requests stream (``/generate``) so that time to
first token and time per output token are measured at the client.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp

from dualpath.traces import AgentTrace, Turn

VOCAB = (3, 32000)  # ids 0..2 are pad/bos/eos of the tiny model


@dataclass(frozen=True)
class RequestRecord:
    agent_id: str
    turn: int
    prompt_tokens: int
    context_tokens: int
    output_tokens: int
    start_s: float
    ttft_s: float
    e2e_s: float
    ok: bool
    error: str = ""
    token_intervals_s: tuple[float, ...] = ()  # between the stream's tokens after the first (inter-token latency)
    top_logprobs: TopLogprobs = ()  # when asked for

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class ReplayResult:
    records: tuple[RequestRecord, ...]
    jct_s: dict[str, float]  # agent -> time its measured requests took, end to end
    round_s: tuple[float, ...]  # each measured round's wall time, in order

    @property
    def makespan_s(self) -> float:
        return sum(self.round_s)


def _fresh(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(count)]


# The top-k (logprob, token id) of every output token: outputs are compared by these, not by greedy ids alone.
TopLogprobs = tuple[tuple[tuple[float, int], ...], ...]
TOP_LOGPROBS = 5


def same_logprobs(a: TopLogprobs, b: TopLogprobs, tol: float = 1e-4) -> bool:
    """Whether two outputs have the same top-k tokens at every position, their logprobs within ``tol``."""
    return len(a) == len(b) and all(
        len(x) == len(y) and all(i == j and abs(p - q) <= tol for (p, i), (q, j) in zip(x, y, strict=True))
        for x, y in zip(a, b, strict=True))


class Streamed(NamedTuple):
    output_ids: list[int]
    ttft_s: float
    token_intervals_s: tuple[float, ...]
    top_logprobs: TopLogprobs = ()


async def stream_generate(session: aiohttp.ClientSession, url: str, ids: list[int], max_new: int,
                    timeout_s: float, top_logprobs: int = 0) -> Streamed:
    """Stream one request: its output ids, the seconds to the first chunk and between the tokens after it and,
    with ``top_logprobs`` > 0, the top-k logprobs of every output token."""
    body: dict = {"input_ids": ids, "stream": True,
                  "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    if top_logprobs:
        body |= {"return_logprob": True, "top_logprobs_num": top_logprobs}
    tops: TopLogprobs = ()
    started = time.perf_counter()
    first: float | None = None
    output: list[int] = []
    intervals: list[float] = []
    last = 0.0
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(f"{url}/generate", json=body, timeout=timeout) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(str(chunk["error"])[:300])
            now = time.perf_counter()
            if first is None:
                first = now - started
            if top_logprobs and (so_far := (chunk.get("meta_info") or {}).get("output_top_logprobs")):
                tops = tuple(tuple((float(p), int(t)) for p, t, *_ in top) for top in so_far)  # every token so far
            ids_so_far = chunk.get("output_ids") or []
            grown = ids_so_far if len(ids_so_far) >= len(output) else output + ids_so_far
            if (new := len(grown) - len(output)) > 0:
                if output:  # a chunk of k tokens after the first: k intervals of (its wait) / k
                    intervals += [(now - last) / new] * new
                last, output = now, grown
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return Streamed(output, first, tuple(intervals), tops)


class AgentHistory:
    """One agent's history: its previous prompts and the ids the server generated for them."""

    def __init__(self, trace: AgentTrace, seed: int, scale: float, blocks: dict[int, list[int]]) -> None:
        self.trace = trace
        self.seed = seed
        self.rng = random.Random(f"{seed}:{trace.agent_id}")
        self.scale = scale
        self.blocks = blocks  # content id -> its ids, shared by the agents of one replay
        self.history: list[int] = [1]
        self.last_prompt: list[int] = []
        self.busy_s = 0.0

    def prompt(self, turn: int) -> tuple[list[int], int]:
        t = self.trace.turns[turn]
        if t.blocks:
            return self._from_blocks(t)
        context = min(int(t.context_tokens * self.scale), len(self.history))
        return self.history[:context] + _fresh(self.rng, max(1, int(t.append_tokens * self.scale))), context

    def _from_blocks(self, t: Turn) -> tuple[list[int], int]:
        block_tokens = max(1, int(self.trace.block_tokens * self.scale))
        length = max(1, int(t.prompt_tokens * self.scale))
        prompt: list[int] = []
        for block in t.blocks[:-(-length // block_tokens)]:
            ids = self.blocks.get(block)
            if ids is None:
                ids = self.blocks[block] = _fresh(random.Random(f"{self.seed}:block:{block}"), block_tokens)
            prompt += ids
        prompt += _fresh(self.rng, length - len(prompt))  # a trace whose ids cover less than its prompt
        return prompt[:length], min(int(t.context_tokens * self.scale), length - 1)


async def run_turn(session: aiohttp.ClientSession, url: str, agent: AgentHistory, index: int, max_gen: int | None,
                timeout_s: float, t0: float, top_logprobs: int = 0) -> RequestRecord:
    prompt, context = agent.prompt(index)
    gen = agent.trace.turns[index].gen_tokens
    gen = min(gen, max_gen) if max_gen else gen
    start = time.perf_counter()
    try:
        output, ttft, intervals, tops = await stream_generate(session, url, prompt, gen, timeout_s, top_logprobs)
        record = RequestRecord(agent.trace.agent_id, index, len(prompt), context, len(output), start - t0, ttft,
                               time.perf_counter() - start, True, token_intervals_s=intervals, top_logprobs=tops)
    except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError) as exc:
        output = _fresh(agent.rng, gen)  # the agent carries on as if it had an answer
        record = RequestRecord(agent.trace.agent_id, index, len(prompt), context, 0, start - t0, 0.0,
                               time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}")
    agent.history = prompt + output
    agent.busy_s += record.e2e_s
    agent.last_prompt = prompt
    return record


class Replay:
    """One replay of ``agents`` against one front door, advanced a round at a time (turn i of every agent at
    once, as agents working side by side), so that two replays can take turns on one cluster.

    Replays with different ``seed``s use different token ids: neither finds the other's KV anywhere. The first
    ``warmup_rounds`` rounds (computing the first contexts) are not measured. ``scale`` shrinks every turn's
    token counts (hit ratios stay).
    """

    def __init__(self, url: str, agents: Sequence[AgentTrace], seed: int = 0, max_gen: int | None = None,
                 timeout_s: float = 600.0, scale: float = 1.0, warmup_rounds: int = 1) -> None:
        self.url, self.max_gen, self.timeout_s, self.warmup_rounds = url, max_gen, timeout_s, warmup_rounds
        blocks: dict[int, list[int]] = {}
        self._agents = [AgentHistory(a, seed, scale, blocks) for a in agents]
        self.rounds = max((len(a.turns) for a in agents), default=0)
        self._records: list[RequestRecord] = []
        self._round_s: list[float] = []

    @property
    def measured_requests(self) -> int:
        return sum(max(0, len(a.trace.turns) - self.warmup_rounds) for a in self._agents)

    def measured(self, index: int) -> bool:
        return index >= self.warmup_rounds

    async def round(self, session: aiohttp.ClientSession, index: int) -> tuple[list[RequestRecord], list[list[int]]]:
        """Run round ``index``: its records (kept for :meth:`result` when the round is measured) and prompts."""
        active = [a for a in self._agents if index < len(a.trace.turns)]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(run_turn(session, self.url, a, index, self.max_gen, self.timeout_s, t0,
                                            TOP_LOGPROBS)
                                      for a in active))
        if self.measured(index):
            self._round_s.append(time.perf_counter() - t0)
            self._records += done
        else:
            for agent in self._agents:
                agent.busy_s = 0.0
        return list(done), [a.last_prompt for a in active]

    def last_turns(self) -> list[tuple[list[int], RequestRecord]]:
        """Each agent's last prompt with its record, where that request was measured and answered."""
        last = {(r.agent_id, r.turn): r for r in self._records if r.ok}
        return [(a.last_prompt, record) for a in self._agents
                if (record := last.get((a.trace.agent_id, len(a.trace.turns) - 1))) is not None]

    def result(self) -> ReplayResult:
        return ReplayResult(tuple(self._records), {a.trace.agent_id: a.busy_s for a in self._agents},
                            tuple(self._round_s))
