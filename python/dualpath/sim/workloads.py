"""Named workloads for the simulator CLI and benchmarks, built from the shared trace loaders."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from dualpath.traces import SYNTHETIC, AgentTrace, Turn, load_claude_code, load_mooncake, synthetic_agents

WORKLOADS = ("synthetic-32k", "synthetic-48k", "synthetic-64k", "claude-code", "mooncake")


def build_workload(name: str, agents: int, seed: int = 0, append_scale: float = 1.0,
                   gen_scale: float = 1.0) -> list[AgentTrace]:
    """`agents` trajectories of a named workload. Trace sets with fewer sessions are replayed in turn;
    Mooncake requests keep their own arrival times (the first `agents` of the trace). The scales (synthetic
    sets only: they have a MAL to truncate at) multiply every turn's append and generation, as in Fig. 9."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    scaled = (append_scale, gen_scale) != (1.0, 1.0)
    if name.startswith("synthetic-") and name.removeprefix("synthetic-") in SYNTHETIC:
        dataset = name.removeprefix("synthetic-")
        traces = synthetic_agents(dataset, agents, seed)
        return scale_lengths(traces, append_scale, gen_scale, SYNTHETIC[dataset].max_len) if scaled else traces
    if scaled:
        raise ValueError(f"length scales apply to the synthetic sets only, not {name!r}")
    if name == "claude-code":
        sessions = load_claude_code()
        return [AgentTrace(f"{sessions[i % len(sessions)].agent_id}#{i}", sessions[i % len(sessions)].turns)
                for i in range(agents)]
    if name == "mooncake":
        return load_mooncake(limit=agents)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def scale_lengths(traces: Sequence[AgentTrace], append_scale: float, gen_scale: float,
                  max_len: int) -> list[AgentTrace]:
    """Every turn's append and generation times a constant (at least one token each), contexts re-accumulated,
    each trajectory cut before its first turn that would pass `max_len` (the first turn is always kept): the
    paper's Fig. 9 sweep. Copies of one trajectory keep sharing their turn records (48K agents fit in memory)."""
    if append_scale <= 0 or gen_scale <= 0:
        raise ValueError(f"length scales must be > 0, got {append_scale}, {gen_scale}")
    done: dict[int, tuple[Turn, ...]] = {}
    out = []
    for trace in traces:
        if id(trace.turns) not in done:
            done[id(trace.turns)] = _scaled_turns(trace.turns, append_scale, gen_scale, max_len)
        out.append(replace(trace, turns=done[id(trace.turns)]))
    return out


def _scaled_turns(turns: Sequence[Turn], append_scale: float, gen_scale: float, max_len: int) -> tuple[Turn, ...]:
    context, scaled = 0, []
    for turn in turns:
        append = max(round(turn.append_tokens * append_scale), 1)
        gen = max(round(turn.gen_tokens * gen_scale), 1)
        if scaled and context + append + gen > max_len:
            break
        scaled.append(replace(turn, context_tokens=context, append_tokens=append, gen_tokens=gen))
        context += append + gen
    return tuple(scaled)


def parse_pd(text: str) -> tuple[int, int]:
    """'2P4D' -> (2, 4): prefill and decode node counts."""
    match = re.fullmatch(r"(\d+)P(\d+)D", text.strip(), flags=re.IGNORECASE)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"P/D setting must look like 2P4D with counts >= 1, got {text!r}")
    return int(match[1]), int(match[2])
