"""PE intra-engine scheduling: FIFO packing of prefill work under a compute quota (paper section 6.2).

Each request in a forward batch is a pair (cached, new): `cached` tokens already have KV (store hit or an
earlier chunk), `new` tokens are computed now. The batch's attention time is predicted from those pairs by a
linear model whose coefficients are fitted from profiled batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

PairsCost = Callable[[Sequence[tuple[int, int]]], float]


@runtime_checkable
class BatchCost(Protocol):
    """A batch's predicted time built up one request at a time: `add` folds a (cached, new) pair into an
    accumulator, `seconds` prices it. The batcher then prices every candidate (each probe of its search for
    the last chunk) in O(1) instead of re-pricing the whole batch."""

    def empty(self) -> Any: ...

    def add(self, acc: Any, cached: int, new: int) -> Any: ...

    def seconds(self, acc: Any) -> float: ...


class _WholeBatchCost:
    """Any callable over the batch's (cached, new) pairs as a BatchCost: the accumulator is the pairs."""

    def __init__(self, cost: PairsCost) -> None:
        self.cost = cost

    def empty(self) -> tuple[tuple[int, int], ...]:
        return ()

    def add(self, acc: tuple[tuple[int, int], ...], cached: int, new: int) -> tuple[tuple[int, int], ...]:
        return (*acc, (cached, new))

    def seconds(self, acc: tuple[tuple[int, int], ...]) -> float:
        return self.cost(acc)


def attended_pairs(cached: int, new: int, topk: int | None) -> float:
    """(query, key) pairs the `new` tokens attend to: each sees its prefix (cached + position), capped at
    `topk` keys for sparse attention (DeepSeek DSA attends to its top-k tokens only)."""
    if topk is None or cached + new <= topk:
        return new * (cached + (new + 1) / 2)
    if cached >= topk:
        return new * topk
    grow = topk - cached  # the first tokens grow up to topk, the rest see exactly topk
    return grow * (cached + (grow + 1) / 2) + (new - grow) * topk


class Chunk(NamedTuple):
    """Prefill work for one request in one forward: `new` tokens computed on top of `cached` ones."""

    key: int
    cached: int
    new: int


@dataclass(frozen=True)
class AttentionCostModel:
    """time = base_s + per_token_s * sum(new) + per_pair_s * sum(attended_pairs(cached, new, topk)).

    Defaults are placeholders of the right order for one Hopper GPU; `fit` replaces them with least squares
    over profiled batches.
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
            attended += attended_pairs(cached, new, topk)
        return tokens, attended

    def predict(self, pairs: Sequence[tuple[int, int]]) -> float:
        if not pairs:
            return 0.0
        return self.seconds(self.features(pairs, self.topk))

    # BatchCost: the accumulator is the features (new tokens, attended pairs), summed in batch order.
    def empty(self) -> tuple[float, float]:
        return 0.0, 0.0

    def add(self, acc: tuple[float, float], cached: int, new: int) -> tuple[float, float]:
        return acc[0] + new, acc[1] + attended_pairs(cached, new, self.topk)

    def seconds(self, acc: tuple[float, float]) -> float:
        tokens, attended = acc
        return self.base_s + self.per_token_s * tokens + self.per_pair_s * attended

    @staticmethod
    def fit(batches: Sequence[Sequence[tuple[int, int]]], seconds: Sequence[float],
            topk: int | None = None) -> AttentionCostModel:
        """Non-negative least-squares coefficients from profiled batches (each a list of (cached, new)) and their
        times. Unconstrained coefficients clipped at zero would not fit: with few distinct batch shapes the
        solution can trade a negative per-pair cost against an inflated per-token one."""
        from scipy.optimize import nnls  # the servers' fit only: the router installs without scipy

        if len(batches) != len(seconds) or len(batches) < 3:
            raise ValueError(f"need >= 3 profiled batches with one time each, got {len(batches)} and {len(seconds)}")
        rows = np.asarray([(1.0, *AttentionCostModel.features(b, topk)) for b in batches])
        scale = np.maximum(rows.max(axis=0), 1e-30)  # features span 1 to ~1e9: solve on comparable columns
        coef, _ = nnls(rows / scale, np.asarray(seconds, dtype=float))
        base, per_token, per_pair = (float(c) for c in coef / scale)
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
    """Forms one forward batch from a FIFO of (key, cached, remaining new) entries. `cost` is a BatchCost
    (such as an AttentionCostModel) or any callable pricing a whole list of (cached, new) pairs."""

    SECANT_STEPS = 6  # before bisection takes over; a chunk crossing top-k (convex cost) may need 4-5

    def __init__(self, cost: BatchCost | PairsCost, config: BatcherConfig | None = None) -> None:
        self.cost: BatchCost = cost if isinstance(cost, BatchCost) else _WholeBatchCost(cost)
        self.config = config or BatcherConfig()

    def form_batch(self, queue: Sequence[Chunk]) -> list[Chunk]:
        """Whole requests FIFO while the prediction stays within the quota; the next one is chunked to the
        largest `new` that still fits (see `_largest_fit`). A head request that alone exceeds the quota is
        chunked too, to at least one token, so the engine always makes progress."""
        quota, cap, cost = self.config.quota_s, self.config.max_tokens, self.cost
        batch: list[Chunk] = []
        acc = cost.empty()
        resident = 0
        for entry in queue:
            if entry.new < 1 or entry.cached < 0:
                raise ValueError(f"queue entry {entry.key} needs new >= 1 and cached >= 0, got {entry}")
            room = None if cap is None else cap - resident - entry.cached
            if room is not None and room < 1:
                break
            whole = entry.new if room is None else min(entry.new, room)
            if whole == entry.new:
                grown = cost.add(acc, entry.cached, entry.new)
                if cost.seconds(grown) <= quota:
                    batch.append(entry)
                    acc = grown
                    resident += entry.cached + entry.new
                    continue
            new = self._largest_fit(acc, entry.cached, whole, quota)
            if new == 0 and not batch:
                new = 1
            if new > 0:
                batch.append(Chunk(entry.key, entry.cached, new))
            break
        return batch

    def _largest_fit(self, acc: Any, cached: int, upper: int, quota: float) -> int:
        """The largest `new` in [1, upper] for which the batch plus (cached, new) stays within the quota, or 0.

        The cost grows with `new`, so the answer is the boundary of a monotone predicate and any exact search
        finds the same one. Secant steps come first (Illinois variant: an end kept twice in a row counts half,
        so guesses close in from both sides instead of creeping up a convex cost), then bisection finishes
        whatever bracket is left: ~5 probes instead of the ~12 of bisection alone."""
        cost = self.cost

        def price(new: int) -> float:
            return cost.seconds(cost.add(acc, cached, new))

        low, high = price(1), price(upper)  # only real chunks are priced: never new = 0
        if high <= quota:
            return upper
        if low > quota:
            return 0
        lo, hi = 1, upper - 1  # invariant: lo fits, hi + 1 does not
        below, above = quota - low, high - quota  # how far the costs at lo and hi + 1 are from the quota
        kept = 0  # +1: lo moved last step, -1: hi moved
        for _ in range(self.SECANT_STEPS):
            if lo == hi:
                break
            guess = min(max(lo + int((hi + 1 - lo) * below / (below + above)), lo + 1), hi)
            guess_cost = price(guess)
            if guess_cost <= quota:
                lo, below = guess, quota - guess_cost
                above = above / 2 if kept == 1 else above
                kept = 1
            else:
                hi, above = guess - 1, guess_cost - quota
                below = below / 2 if kept == -1 else below
                kept = -1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if price(mid) <= quota:
                lo = mid
            else:
                hi = mid - 1
        return lo
