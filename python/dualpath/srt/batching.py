"""The PE compute-quota batcher (paper section 6.2) applied to SGLang's prefill batch selection.

SGLang's ``PrefillAdder`` packs the waiting queue FIFO under two token budgets (``max_prefill_tokens``
and ``chunked_prefill_size``) and chunks the request that overflows them. Around each prefill batch
selection the hook below sets both budgets, for that selection only, to the new tokens the DualPath
batcher packs under the attention-time quota: whole requests while the predicted time fits, then the
largest chunk of the next one. Long-context requests thus get small chunks and short ones share a batch.

The quota prices a batch with an attention cost model (``base + per_token x new + per_pair x attended
pairs``): given on the command line, or fitted by non-negative least squares to the server's own prefill
batches (:class:`CostProfile`): after ``WARMUP_BATCHES`` the first ``MIN_BATCHES`` are timed, then one in
``RESAMPLE_EVERY``, over a window of the last ``WINDOW``, fitted once their sizes differ enough to tell a
fixed cost from a per-token one. Until the first fit, and while the fixed cost alone exceeds the quota,
the scheduler keeps SGLang's own budgets. Time a batch spends waiting for a DE's layers
(``layers.LayerGate``) is not compute and is left out.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from dualpath.scheduler.batcher import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
from dualpath.srt import surface

log = logging.getLogger(__name__)
# The first batches (SGLang's warm-up request, first-touch costs) are not timed.
WARMUP_BATCHES, MIN_BATCHES, RESAMPLE_EVERY, WINDOW = 2, 8, 16, 256
# A fit needs batches of different sizes: the largest at least this many times the smallest (new tokens).
SIZE_SPREAD = 4


def prefill_budget(batcher: ComputeQuotaBatcher, queue: Sequence[Chunk], page_size: int) -> int | None:
    """New tokens of the next batch, rounded up to whole pages (None: nothing waits)."""
    batch = batcher.form_batch([c for c in queue if c.new > 0])
    if not batch:
        return None
    tokens = sum(c.new for c in batch)
    return -(-tokens // page_size) * page_size


class CostProfile:
    """The prefill's attention cost model (a ``BatchCost``): the given one, or the latest fit to timed batches."""

    def __init__(self, given: AttentionCostModel | None = None) -> None:
        self.model, self.fitting = given, given is None
        self._batches: deque[list[tuple[int, int]]] = deque(maxlen=WINDOW)
        self._seconds: deque[float] = deque(maxlen=WINDOW)
        self._seen = 0

    def wants_timing(self) -> bool:
        """Whether to time the next prefill batch."""
        self._seen += 1
        if not self.fitting or self._seen <= WARMUP_BATCHES:
            return False
        return len(self._batches) < MIN_BATCHES or self._seen % RESAMPLE_EVERY == 0

    def observe(self, pairs: list[tuple[int, int]], seconds: float) -> None:
        """One timed prefill batch: its (cached, new) pairs and the seconds it computed."""
        self._batches.append(pairs)
        self._seconds.append(seconds)
        sizes = [sum(new for _, new in batch) for batch in self._batches]
        # Batches of one size tell a fixed cost from a per-token one no better than a guess.
        if len(sizes) >= MIN_BATCHES and max(sizes) >= SIZE_SPREAD * max(min(sizes), 1):
            first = self.model is None
            self.model = AttentionCostModel.fit(list(self._batches), list(self._seconds))
            if first:
                log.info("DualPath: prefill cost model fitted to %d batches: %s", len(self._batches), self.model)

    def empty(self) -> Any:
        return self._model().empty()

    def add(self, acc: Any, cached: int, new: int) -> Any:
        return self._model().add(acc, cached, new)

    def seconds(self, acc: Any) -> float:
        return self._model().seconds(acc)

    def _model(self) -> AttentionCostModel:
        if self.model is None:
            raise RuntimeError("no cost model yet: the quota is not applied before the first fit")
        return self.model


class BatchTimer:
    """AROUND hook of ``Scheduler.run_batch``: times the prefill batches the profile asks for."""

    def __init__(self, profile: CostProfile, clock: Callable[[], float] = time.perf_counter) -> None:
        self.profile, self._clock = profile, clock

    def __call__(self, original: Callable[..., Any], scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        pairs = surface.prefill_pairs(batch)
        if not pairs or not self.profile.wants_timing():
            return original(scheduler, batch, *args, **kwargs)
        gate = getattr(surface.storage_backend(scheduler), "gate", None)  # waits for a DE's layers are not compute
        waited_before, started = getattr(gate, "waited_s", 0.0), self._clock()
        result = original(scheduler, batch, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the forward runs asynchronously; sampled batches only
        waited = getattr(gate, "waited_s", 0.0) - waited_before
        self.profile.observe(pairs, max(self._clock() - started - waited, 0.0))
        return result


class QuotaHook:
    """AROUND hook of ``Scheduler.get_new_batch_prefill``."""

    def __init__(self, quota_s: float, profile: CostProfile) -> None:
        self.profile = profile
        self.batcher = ComputeQuotaBatcher(profile, BatcherConfig(quota_s=quota_s))

    def __call__(self, original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.profile.model
        if model is None or model.base_s >= self.batcher.config.quota_s:
            # Not fitted yet, or no batch can meet the quota (chunks would only shrink to a page): SGLang's budgets.
            return original(scheduler, *args, **kwargs)
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
