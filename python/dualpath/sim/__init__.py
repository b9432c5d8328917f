"""Discrete-event simulator of a PD cluster running the production DualPath scheduler."""

from __future__ import annotations

from dualpath.scheduler.modes import MODES, Mode, get_mode
from dualpath.sim.cluster import Cluster, ClusterSpec
from dualpath.sim.hardware import DS27B_GEOMETRY, MODELS, HardwareSpec, ModelSpec, get_model
from dualpath.sim.runner import RunResult, capacity_at_slo, meets_slo, run_offline, run_online
from dualpath.sim.workloads import WORKLOADS, build_workload, parse_pd

__all__ = [
    "DS27B_GEOMETRY",
    "MODELS",
    "MODES",
    "WORKLOADS",
    "Cluster",
    "ClusterSpec",
    "HardwareSpec",
    "Mode",
    "ModelSpec",
    "RunResult",
    "build_workload",
    "capacity_at_slo",
    "get_mode",
    "get_model",
    "meets_slo",
    "parse_pd",
    "run_offline",
    "run_online",
]
