"""Node-wide software priority limiter: model traffic first, KV traffic the leftover, never starved.

On a cluster the NIC's VL arbiter (IB) or ETS queues (RoCE) enforce traffic classes. One host has no
such fabric, so every process of a "node" reserves its bytes on one shared timeline instead: a small
mmap'd file, updated under ``flock`` (across processes) and a thread lock (inside one).

Grant rule, non-preemptive like a link that never cuts a packet in half:
- a model grant starts when the link timeline is free, and marks model traffic active until shortly
  after it ends;
- a KV grant (at most ``max_grant_bytes``) waits while model traffic is active; once it has waited
  ``promote_after_s`` it is served anyway (anti-starvation promotion, as in Mooncake TENT's QoS);
- a grant of ``n`` bytes occupies the timeline for ``n / rate``; the caller sleeps until its start.
Model traffic is thus delayed by at most one KV grant, and KV gets every gap plus one grant per
promotion period under saturation.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from dualpath.interprocess import FileLock
from dualpath.transfer.config import LimiterConfig, TrafficClass

# Slots of the shared state (float64).
(_RATE, _FREE_AT, _MODEL_ACTIVE_UNTIL, _MODEL_BYTES, _KV_BYTES, _PROMOTIONS, _MODEL_WAITED, _MODEL_BUSY, _KV_END,
 _MODEL_WAITED_FOR_KV) = range(10)
_SLOTS = 10
# Model grants closer together than this count as one busy period (time to post the next transfer).
MODEL_GRACE_S = 0.001


class LimiterStats(NamedTuple):
    bytes_per_s: float
    model_bytes: int
    kv_bytes: int
    promotions: int
    model_waited_s: float  # model grants' time between asking and starting, summed
    model_busy_s: float  # model grants' time on the link, summed
    model_waited_for_kv_s: float  # the part of model grants' waits spent behind KV grants

    @property
    def model_share(self) -> float:
        """Model traffic's throughput relative to an idle link: 1.0 when no model grant ever waited."""
        spent = self.model_busy_s + self.model_waited_s
        return self.model_busy_s / spent if spent else 1.0

    @property
    def model_share_left_by_kv(self) -> float:
        """Model traffic's throughput relative to the same link without KV traffic (waits behind other model
        grants count as the link's own): 1.0 when no model grant ever waited for a KV grant."""
        spent = self.model_busy_s + self.model_waited_for_kv_s
        return self.model_busy_s / spent if spent else 1.0


class PriorityLimiter:
    """Shared by every process that opens the same ``config.path``; the last opener's rate wins."""

    def __init__(
        self,
        config: LimiterConfig,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock, self._sleep = clock, sleep
        config.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(config.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(self._fd).st_size < _SLOTS * 8:
                os.ftruncate(self._fd, _SLOTS * 8)
            self._map = mmap.mmap(self._fd, _SLOTS * 8)
        except OSError:
            os.close(self._fd)
            raise
        self._state = np.frombuffer(self._map, dtype=np.float64, count=_SLOTS)
        self._locked = FileLock(self._fd)
        with self._locked:
            self._state[_RATE] = config.bytes_per_s

    def reserve(self, nbytes: int, traffic: TrafficClass, waited_s: float = 0.0) -> float | None:
        """Book ``nbytes`` on the timeline and return the grant's start time, or None: KV must wait."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if traffic is TrafficClass.KV and nbytes > self.config.max_grant_bytes:
            raise ValueError(f"a KV grant is at most {self.config.max_grant_bytes} bytes, asked {nbytes}")
        with self._locked:
            state = self._state
            now = self._clock()
            if traffic is TrafficClass.KV and now < state[_MODEL_ACTIVE_UNTIL]:
                if waited_s < self.config.promote_after_s:
                    return None
                state[_PROMOTIONS] += 1
            start = max(now, state[_FREE_AT])
            state[_FREE_AT] = start + nbytes / state[_RATE]
            if traffic is TrafficClass.MODEL:
                state[_MODEL_ACTIVE_UNTIL] = state[_FREE_AT] + MODEL_GRACE_S
                state[_MODEL_BYTES] += nbytes
                state[_MODEL_WAITED] += start - now
                state[_MODEL_WAITED_FOR_KV] += min(max(state[_KV_END] - now, 0.0), start - now)
                state[_MODEL_BUSY] += nbytes / state[_RATE]
            else:
                state[_KV_BYTES] += nbytes
                state[_KV_END] = state[_FREE_AT]
            return float(start)

    def acquire(self, nbytes: int, traffic: TrafficClass) -> None:
        """Block (sleeping, never spinning) until ``nbytes`` of ``traffic`` may go on the link."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        chunk = nbytes if traffic is TrafficClass.MODEL else self.config.max_grant_bytes
        for offset in range(0, nbytes, chunk):
            self._acquire_one(min(chunk, nbytes - offset), traffic)

    def _acquire_one(self, nbytes: int, traffic: TrafficClass) -> None:
        asked = self._clock()
        while (start := self.reserve(nbytes, traffic, self._clock() - asked)) is None:
            with self._locked:
                busy_for = float(self._state[_MODEL_ACTIVE_UNTIL]) - self._clock()
            promote_in = asked + self.config.promote_after_s - self._clock()
            self._sleep(max(1e-4, min(busy_for, promote_in)))
        delay = start - self._clock()
        if delay > 0:
            self._sleep(delay)

    def stats(self) -> LimiterStats:
        with self._locked:
            s = self._state
            return LimiterStats(float(s[_RATE]), int(s[_MODEL_BYTES]), int(s[_KV_BYTES]), int(s[_PROMOTIONS]),
                                float(s[_MODEL_WAITED]), float(s[_MODEL_BUSY]), float(s[_MODEL_WAITED_FOR_KV]))

    def close(self) -> None:
        del self._state
        self._map.close()
        os.close(self._fd)

