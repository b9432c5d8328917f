"""Trace loaders: one typed shape (agent -> turns) for every workload the project replays.

A turn's `context_tokens` is what the store can serve (hit KV, computed client-side as the paper does), its
`append_tokens` are prefilled anew and `gen_tokens` are decoded; `think_s` is the agent's pause before sending.
Loaders are independent of the simulator so that the replay client can reuse them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path

import numpy as np

# Samples of the real traces ship with the package (data/README.md); pass a path for the full sets.
SAMPLES_DIR = Path(__file__).resolve().parent / "data"
CLAUDE_CODE_DIR = SAMPLES_DIR / "claude-code"
MOONCAKE_FILE = SAMPLES_DIR / "mooncake" / "conversation_trace_head1000.jsonl"


@dataclass(frozen=True, slots=True)
class Turn:
    context_tokens: int
    append_tokens: int
    gen_tokens: int
    think_s: float = 0.0
    blocks: tuple[int, ...] = ()  # the prompt's content, one id per `AgentTrace.block_tokens` (equal ids, equal tokens)

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens + self.append_tokens


@dataclass(frozen=True, slots=True)
class AgentTrace:
    """One agent's trajectory; `arrival_s` is when its first turn may be sent (0 for offline sets)."""

    agent_id: str
    turns: tuple[Turn, ...]
    arrival_s: float = 0.0
    block_tokens: int = 0  # tokens per id of `Turn.blocks` (0: the trace gives no content ids)


def _prefix_hits(hash_ids: Sequence[int], seen: set[tuple[int, int]]) -> int:
    """Blocks of `hash_ids` whose whole prefix was seen before; records this request's prefix chain."""
    parent, hits, matching = 0, 0, True
    for block in hash_ids:
        key = (parent, block)
        if matching and key in seen:
            hits += 1
        else:
            matching = False
            seen.add(key)
        parent = hash(key)
    return hits


def load_claude_code(directory: Path = CLAUDE_CODE_DIR, limit: int | None = None) -> list[AgentTrace]:
    """Claude Code sessions: one agent per file; hits are the 64-token blocks shared with earlier requests."""
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ValueError(f"no Claude Code session files (*.json) in {directory}")
    agents = []
    for path in files[:limit]:
        session = json.loads(path.read_text())
        block = int(session["block_size"])
        seen: set[tuple[int, int]] = set()
        turns = []
        for request in sorted(session["requests"], key=lambda r: r["t"]):
            prompt = int(request["in"])
            cached = min(_prefix_hits(request["hash_ids"], seen) * block, prompt - 1)
            turns.append(Turn(cached, prompt - cached, max(int(request["out"]), 1),
                              float(request.get("think_time") or 0.0)))
        agents.append(AgentTrace(str(session["id"]), tuple(turns)))
    return agents


def load_mooncake(path: Path = MOONCAKE_FILE, limit: int | None = None, block_tokens: int = 512) -> list[AgentTrace]:
    """Mooncake conversation trace: no sessions, so each request is a one-turn agent arriving at its
    timestamp; hits are the 512-token prefix blocks any earlier request already produced."""
    if not path.is_file():
        raise ValueError(f"Mooncake trace not found at {path}")
    seen: set[tuple[int, int]] = set()
    agents = []
    with path.open() as lines:
        for index, line in enumerate(lines):
            if limit is not None and index >= limit:
                break
            record = json.loads(line)
            prompt = int(record["input_length"])
            cached = min(_prefix_hits(record["hash_ids"], seen) * block_tokens, prompt - 1)
            turn = Turn(cached, prompt - cached, max(int(record["output_length"]), 1),
                        blocks=tuple(int(h) for h in record["hash_ids"]))
            agents.append(AgentTrace(f"mooncake-{index}", (turn,), float(record["timestamp"]) / 1000.0,
                                     block_tokens))
    return agents


def mooncake_sessions(requests: Sequence[AgentTrace]) -> list[AgentTrace]:
    """The conversations of a trace without session ids (Mooncake's one-turn agents, in arrival order): a
    request that shares at least two leading blocks with an earlier one continues that request's session
    (every conversation shares the first, its system prompt). Turns keep their blocks; a turn's context is
    what its own session sent before, as for Claude Code sessions. Sessions come in order of their first
    request."""
    owner: dict[int, int] = {}  # chained prefix key -> the latest request that sent that prefix
    session_of: list[int] = []
    members: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        if len(request.turns) != 1 or not request.turns[0].blocks:
            raise ValueError(f"{request.agent_id}: sessions are built from one-turn requests with blocks")
        keys = list(accumulate(request.turns[0].blocks, lambda key, block: hash((key, block)), initial=0))[1:]
        session = index
        for depth, key in enumerate(keys, 1):
            if key not in owner:
                break
            if depth >= 2:
                session = session_of[owner[key]]
        session_of.append(session)
        members.setdefault(session, []).append(index)
        owner.update(dict.fromkeys(keys, index))
    sessions = []
    for first, indices in members.items():
        block_tokens = requests[first].block_tokens
        seen: set[tuple[int, int]] = set()
        turns = []
        for turn in (requests[i].turns[0] for i in indices):
            prompt = turn.prompt_tokens
            cached = min(_prefix_hits(turn.blocks, seen) * block_tokens, prompt - 1)
            turns.append(replace(turn, context_tokens=cached, append_tokens=prompt - cached))
        sessions.append(AgentTrace(f"{requests[first].agent_id}-session", tuple(turns),
                                   requests[first].arrival_s, block_tokens))
    return sessions


@dataclass(frozen=True)
class SyntheticSpec:
    """Paper Table 2 row: max agent length and the per-trajectory means the generator aims at."""

    max_len: int
    turns: float
    append: float
    gen: float
    total: float


# Table 2 (paper section 7.2). Append/gen are per-trajectory means of per-turn averages, so they do not
# multiply out to `total`; the generator matches turns and total and keeps append:gen in proportion.
SYNTHETIC = {
    "32k": SyntheticSpec(32 * 1024, 60, 608, 148, 28_639),
    "48k": SyntheticSpec(48 * 1024, 106, 474, 172, 42_607),
    "64k": SyntheticSpec(64 * 1024, 157, 429, 176, 55_958),
}


def synthetic_agents(dataset: str, agents: int, seed: int = 0, distinct: int = 500) -> list[AgentTrace]:
    """Seeded trajectories with Table 2's means: a lognormal turn count, a total length below MAL, a first
    turn holding the task prompt and the rest split into per-turn appends and generations.

    Like the paper's sets, only `distinct` (500) trajectories exist; more agents replay them in turn. The
    paper prepends a random one-token round to each copy so that copies share no KV; here hits are counted
    per agent anyway, so copies share the turn records (which keeps 48K agents in memory)."""
    spec = SYNTHETIC.get(dataset)
    if spec is None:
        raise ValueError(f"unknown synthetic dataset {dataset!r}; choose from {', '.join(SYNTHETIC)}")
    if agents < 1 or distinct < 1:
        raise ValueError(f"agents and distinct must be >= 1, got {agents}, {distinct}")
    rng = np.random.default_rng(seed)
    gen_share = spec.gen / (spec.append + spec.gen)
    base: list[tuple[Turn, ...]] = []
    for _ in range(min(agents, distinct)):
        turns = int(np.clip(rng.lognormal(np.log(spec.turns) - 0.1, 0.45), 2, spec.max_len // 128))
        total = int(np.clip(rng.normal(spec.total, 0.2 * spec.total), 4 * turns, spec.max_len))
        first = int(min(0.15 * total, 8192))
        weights = rng.gamma(2.0, size=(turns, 2))
        weights /= weights.sum(axis=0)
        rest = total - first
        appends = np.maximum((weights[:, 0] * rest * (1 - gen_share)).astype(int), 1)
        gens = np.maximum((weights[:, 1] * rest * gen_share).astype(int), 1)
        appends[0] += first
        context, trajectory = 0, []
        for append, gen in zip(appends.tolist(), gens.tolist(), strict=True):
            trajectory.append(Turn(context, append, gen))
            context += append + gen
        base.append(tuple(trajectory))
    return [AgentTrace(f"{dataset}-{index}", base[index % len(base)]) for index in range(agents)]
