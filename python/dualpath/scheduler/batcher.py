"""PE intra-engine scheduling: FIFO packing of prefill work under a compute quota (paper section 6.2).

Each request in a forward batch is a pair (cached, new): `cached` tokens already have KV (store hit or an
earlier chunk), `new` tokens are computed now. The batch's attention time is predicted from those pairs by a
linear model whose coefficients are fitted from profiled batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class Chunk(NamedTuple):
    """Prefill work for one request in one forward: `new` tokens computed on top of `cached` ones."""

    key: int
    cached: int
    new: int


@dataclass(frozen=True)
class AttentionCostModel:
    """time = base_s + per_token_s * sum(new) + per_pair_s * sum(new * mean attended context).

    The attended context of a new token is its prefix (cached + position), capped at `topk` for sparse
    attention (DeepSeek DSA attends to its top-k tokens only). Defaults are placeholders of the right order
    for one Hopper GPU; `fit` replaces them with least squares over profiled batches.
    """

    base_s: float = 2e-3
    per_token_s: float = 2e-5
    per_pair_s: float = 2e-10
    topk: int | None = None

    @staticmethod
    def features(pairs: Sequence[tuple[int, int]], topk: int | None) -> tuple[float, float]:
        tokens = 0.0
        attended = 0.0
        for cached, new in pairs:
            tokens += new
            if topk is None or cached + new <= topk:
                attended += new * (cached + (new + 1) / 2)
            elif cached >= topk:
                attended += new * topk
            else:  # the first tokens grow up to topk, the rest see exactly topk
                grow = topk - cached
                attended += grow * (cached + (grow + 1) / 2) + (new - grow) * topk
        return tokens, attended

    def predict(self, pairs: Sequence[tuple[int, int]]) -> float:
        if not pairs:
            return 0.0
        tokens, attended = self.features(pairs, self.topk)
        return self.base_s + self.per_token_s * tokens + self.per_pair_s * attended

    @staticmethod
    def fit(batches: Sequence[Sequence[tuple[int, int]]], seconds: Sequence[float],
            topk: int | None = None) -> AttentionCostModel:
        """Least-squares coefficients from profiled batches (each a list of (cached, new)) and their times."""
        if len(batches) != len(seconds) or len(batches) < 3:
            raise ValueError(f"need >= 3 profiled batches with one time each, got {len(batches)} and {len(seconds)}")
        rows = [(1.0, *AttentionCostModel.features(b, topk)) for b in batches]
        coef, *_ = np.linalg.lstsq(np.asarray(rows), np.asarray(seconds, dtype=float), rcond=None)
        base, per_token, per_pair = (max(float(c), 0.0) for c in coef)
        return AttentionCostModel(base, per_token, per_pair, topk)


@dataclass(frozen=True)
class BatcherConfig:
    """quota_s: predicted time a batch may take (paper: 300 ms). max_tokens: optional cap on the batch's
    prompt tokens (cached + new) resident at once, for engines that keep every layer's KV in HBM."""

    quota_s: float = 0.3
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.quota_s <= 0:
            raise ValueError(f"quota_s must be positive, got {self.quota_s}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class ComputeQuotaBatcher:
    """Forms one forward batch from a FIFO of (key, cached, remaining new) entries."""

    def __init__(self, cost: Callable[[Sequence[tuple[int, int]]], float], config: BatcherConfig | None = None) -> None:
        self.cost = cost
        self.config = config or BatcherConfig()

    def form_batch(self, queue: Sequence[Chunk]) -> list[Chunk]:
        """Whole requests FIFO while the prediction stays within the quota; the next one is chunked to the
        largest `new` that still fits (binary search). A head request that alone exceeds the quota is
        chunked too, to at least one token, so the engine always makes progress."""
        quota, cap = self.config.quota_s, self.config.max_tokens
        batch: list[Chunk] = []
        pairs: list[tuple[int, int]] = []
        resident = 0
        for entry in queue:
            if entry.new < 1 or entry.cached < 0:
                raise ValueError(f"queue entry {entry.key} needs new >= 1 and cached >= 0, got {entry}")
            room = None if cap is None else cap - resident - entry.cached
            if room is not None and room < 1:
                break
            whole = entry.new if room is None else min(entry.new, room)
            if whole == entry.new and self.cost([*pairs, (entry.cached, entry.new)]) <= quota:
                batch.append(entry)
                pairs.append((entry.cached, entry.new))
                resident += entry.cached + entry.new
                continue
            new = self._largest_fit(pairs, entry.cached, whole, quota)
            if new == 0 and not batch:
                new = 1
            if new > 0:
                batch.append(Chunk(entry.key, entry.cached, new))
            break
        return batch

    def _largest_fit(self, pairs: list[tuple[int, int]], cached: int, upper: int, quota: float) -> int:
        lo, hi = 0, upper  # invariant: lo fits (0 trivially), anything above hi is unknown-or-too-big
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost([*pairs, (cached, mid)]) <= quota:
                lo = mid
            else:
                hi = mid - 1
        return lo
