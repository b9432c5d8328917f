"""Global scheduler (PE/DE/read side), its modes and read policies, and the PE compute-quota batcher. Pure
Python, no SGLang import."""

from __future__ import annotations

from dualpath.scheduler.batcher import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
from dualpath.scheduler.config import SchedulerConfig
from dualpath.scheduler.global_scheduler import GlobalScheduler
from dualpath.scheduler.messages import (
    Assignment,
    EngineGroup,
    EngineLoad,
    NodeLoad,
    PrefillPick,
    ReadSide,
    Request,
)
from dualpath.scheduler.modes import MODES, Mode, get_mode
from dualpath.scheduler.read_policies import READ_POLICIES, ReadContext, ReadSplit
from dualpath.scheduler.route_hint import RouteHint

__all__ = [
    "MODES",
    "READ_POLICIES",
    "Assignment",
    "AttentionCostModel",
    "BatcherConfig",
    "Chunk",
    "ComputeQuotaBatcher",
    "EngineGroup",
    "EngineLoad",
    "GlobalScheduler",
    "Mode",
    "NodeLoad",
    "PrefillPick",
    "ReadContext",
    "ReadSide",
    "ReadSplit",
    "Request",
    "RouteHint",
    "SchedulerConfig",
    "get_mode",
]
