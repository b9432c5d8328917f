"""A circuit breaker per server, with the stock router's flags (``--cb-*``) and states.

A server that answers its load polls but fails requests would otherwise flap: marked down by a failure, up again
at the next poll, failing the next request. The breaker counts the request outcomes of each server:

    closed ──(failure_threshold failures within window_s)──> open ──(open_s later)──> half-open
      ^                                                        ^                          │
      └──────────────(success_threshold successes in a row)───┼──────────────────────────┤
                                                               └───────(a failure)────────┘

Nothing is placed on an open server; a half-open one takes requests again and closes after enough successes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum


class BreakerState(IntEnum):
    """The values of ``smg_worker_cb_state``."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 10
    success_threshold: int = 3
    open_s: float = 60.0
    window_s: float = 120.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("--cb-failure-threshold and --cb-success-threshold must be at least 1")
        if not (self.open_s > 0 and self.window_s > 0):
            raise ValueError("--cb-timeout-duration-secs and --cb-window-duration-secs must be positive")


@dataclass
class CircuitBreaker:
    config: BreakerConfig = field(default_factory=BreakerConfig)
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    successes: int = 0
    failures: int = 0
    _opened_at: float = 0.0
    _recent: deque[float] = field(default_factory=deque)  # failure times within the window

    @property
    def allows(self) -> bool:
        return self.state is not BreakerState.OPEN

    def tick(self, now: float) -> bool:
        """Open -> half-open once ``open_s`` has passed; True when the state changed."""
        if self.state is BreakerState.OPEN and now - self._opened_at >= self.config.open_s:
            self.state, self.consecutive_successes = BreakerState.HALF_OPEN, 0
            return True
        return False

    def record(self, success: bool, now: float) -> bool:
        """One request's outcome on the server; True when the state changed."""
        before = self.state
        if success:
            self.successes += 1
            self.consecutive_successes += 1
            self.consecutive_failures = 0
            if not self.config.enabled:  # --disable-circuit-breaker: outcomes counted, the state stays closed
                return False
            if self.state is BreakerState.HALF_OPEN and self.consecutive_successes >= self.config.success_threshold:
                self.state = BreakerState.CLOSED
                self._recent.clear()
        else:
            self.failures += 1
            self.consecutive_failures += 1
            self.consecutive_successes = 0
            if not self.config.enabled:
                return False
            self._recent.append(now)
            while self._recent and now - self._recent[0] > self.config.window_s:
                self._recent.popleft()
            if self.state is BreakerState.HALF_OPEN or len(self._recent) >= self.config.failure_threshold:
                self.state, self._opened_at = BreakerState.OPEN, now
        return self.state is not before
