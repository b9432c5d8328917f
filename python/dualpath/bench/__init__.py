"""Workload traces (Claude Code sessions, Mooncake, the paper's synthetic sets) and, later, replay tools."""
