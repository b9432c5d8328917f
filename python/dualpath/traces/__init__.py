"""Workload traces in one typed shape (agent -> turns): Claude Code sessions, Mooncake, the paper's synthetic sets."""

from dualpath.traces.loaders import (
    CLAUDE_CODE_DIR,
    MOONCAKE_FILE,
    SYNTHETIC,
    AgentTrace,
    SyntheticSpec,
    Turn,
    load_claude_code,
    load_mooncake,
    mooncake_sessions,
    synthetic_agents,
)

__all__ = ["CLAUDE_CODE_DIR", "MOONCAKE_FILE", "SYNTHETIC", "AgentTrace", "SyntheticSpec", "Turn", "load_claude_code",
           "load_mooncake", "mooncake_sessions", "synthetic_agents"]
