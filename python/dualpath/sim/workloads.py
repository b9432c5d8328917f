"""Named workloads for the simulator CLI and benchmarks, built from the shared trace loaders."""

from __future__ import annotations

import re

from dualpath.traces import SYNTHETIC, AgentTrace, load_claude_code, load_mooncake, synthetic_agents

WORKLOADS = ("synthetic-32k", "synthetic-48k", "synthetic-64k", "claude-code", "mooncake")


def build_workload(name: str, agents: int, seed: int = 0) -> list[AgentTrace]:
    """`agents` trajectories of a named workload. Trace sets with fewer sessions are replayed in turn;
    Mooncake requests keep their own arrival times (the first `agents` of the trace)."""
    if agents < 1:
        raise ValueError(f"agents must be >= 1, got {agents}")
    if name.startswith("synthetic-") and name.removeprefix("synthetic-") in SYNTHETIC:
        return synthetic_agents(name.removeprefix("synthetic-"), agents, seed)
    if name == "claude-code":
        sessions = load_claude_code()
        return [AgentTrace(f"{sessions[i % len(sessions)].agent_id}#{i}", sessions[i % len(sessions)].turns)
                for i in range(agents)]
    if name == "mooncake":
        return load_mooncake(limit=agents)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def parse_pd(text: str) -> tuple[int, int]:
    """'2P4D' -> (2, 4): prefill and decode node counts."""
    match = re.fullmatch(r"(\d+)P(\d+)D", text.strip(), flags=re.IGNORECASE)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"P/D setting must look like 2P4D with counts >= 1, got {text!r}")
    return int(match[1]), int(match[2])
