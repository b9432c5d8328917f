"""Global scheduler (PE/DE/read side) and the PE compute-quota batcher. Pure Python, no SGLang import."""

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
from dualpath.scheduler.route_hint import RouteHint

__all__ = [
    "Assignment",
    "AttentionCostModel",
    "BatcherConfig",
    "Chunk",
    "ComputeQuotaBatcher",
    "EngineGroup",
    "EngineLoad",
    "GlobalScheduler",
    "NodeLoad",
    "PrefillPick",
    "ReadSide",
    "Request",
    "RouteHint",
    "SchedulerConfig",
]
