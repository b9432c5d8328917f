"""The PE compute-quota batcher (paper section 6.2) applied to SGLang's prefill batch selection.

SGLang's ``PrefillAdder`` packs the waiting queue FIFO under two token budgets (``max_prefill_tokens``
and ``chunked_prefill_size``) and chunks the request that overflows them. Around each prefill batch
selection the hook below sets both budgets, for that selection only, to the new tokens the DualPath
batcher packs under the attention-time quota: whole requests while the predicted time fits, then the
largest chunk of the next one. Long-context requests thus get small chunks and short ones share a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dualpath.scheduler.batcher import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
from dualpath.srt import surface


def prefill_budget(batcher: ComputeQuotaBatcher, queue: Sequence[Chunk], page_size: int) -> int | None:
    """New tokens of the next batch, rounded up to whole pages (None: nothing waits)."""
    batch = batcher.form_batch([c for c in queue if c.new > 0])
    if not batch:
        return None
    tokens = sum(c.new for c in batch)
    return -(-tokens // page_size) * page_size


class QuotaHook:
    """AROUND hook of ``Scheduler.get_new_batch_prefill``."""

    def __init__(self, quota_s: float, cost: AttentionCostModel) -> None:
        self.batcher = ComputeQuotaBatcher(cost.predict, BatcherConfig(quota_s=quota_s))

    def __call__(self, original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        queue = [Chunk(*queued) for queued in surface.queued_prefills(scheduler)]
        budget = prefill_budget(self.batcher, queue, surface.scheduler_page_size(scheduler))
        if budget is None:
            return original(scheduler, *args, **kwargs)
        saved = max_prefill, chunked = surface.prefill_budgets(scheduler)
        if chunked is not None and chunked > 0:
            chunked = min(chunked, budget)
        surface.set_prefill_budgets(scheduler, (min(max_prefill, budget), chunked))
        try:
            return original(scheduler, *args, **kwargs)
        finally:
            surface.set_prefill_budgets(scheduler, saved)
