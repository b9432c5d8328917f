"""Completion and progress of transfers: one thread per agent, asleep when nothing is under way.

NIXL reports completion only through ``check_xfer_state``, which also drives UCX progress; NIXL's own
progress thread is off because it spins a whole core even when idle. While this side has transfers in
flight, or expects incoming ones (:meth:`CompletionPoller.hold`), this thread polls with an exponential
back-off (20 us -> 200 us): little CPU, and at most the back-off added to a completion. Polling also
collects the NIXL notifications that announce incoming layers. Every handle is released here, on
success, error and timeout alike, before the callback runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dualpath.transfer.agent import KVAgent

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 20e-6
MAX_BACKOFF_S = 2e-4


@dataclass(eq=False)
class _Watch:
    xfer: Any
    deadline: float
    on_done: Callable[[], None]
    on_fail: Callable[[str], None]


class CompletionPoller:
    """Calls ``on_done()`` when a transfer is DONE, ``on_fail(reason)`` on ERR or timeout."""

    def __init__(self, agent: KVAgent, on_notifs: Callable[[dict[str, list[bytes]]], None]) -> None:
        self._agent, self._on_notifs = agent, on_notifs
        self._cond = threading.Condition()
        self._watches: list[_Watch] = []
        self._holds = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"completion-{agent.name}", daemon=True)
        self._thread.start()

    def watch(self, xfer: Any, timeout_s: float, on_done: Callable[[], None], on_fail: Callable[[str], None]) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("completion poller is closed")
            self._watches.append(_Watch(xfer, time.monotonic() + timeout_s, on_done, on_fail))
            self._cond.notify()

    def cancel(self, xfers: set[Any]) -> None:
        """Stop watching ``xfers`` and release them, without callbacks: their request failed already."""
        with self._cond:
            cancelled = [w for w in self._watches if w.xfer in xfers]
            self._watches = [w for w in self._watches if w.xfer not in xfers]
        for watch in cancelled:
            self._agent.release_xfer(watch.xfer)

    def hold(self) -> None:
        """Keep UCX progressing for incoming writes until the matching :meth:`release`."""
        with self._cond:
            self._holds += 1
            self._cond.notify()

    def release(self) -> None:
        with self._cond:
            if self._holds == 0:
                raise RuntimeError("release() without hold()")
            self._holds -= 1

    def in_flight(self) -> int:
        with self._cond:
            return len(self._watches)

    def _run(self) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            with self._cond:
                while not self._watches and not self._holds and not self._closing:
                    self._agent.retry_stuck()
                    self._cond.wait(timeout=1.0 if self._agent.live().xfers else None)
                if self._closing:
                    remaining, self._watches = self._watches, []
                    break
                watches, holds = list(self._watches), self._holds
            arrived = self._agent.progress() if holds else {}
            if arrived:
                self._deliver(arrived)
            finished = [(w, self._outcome(w)) for w in watches]
            finished = [(w, outcome) for w, outcome in finished if outcome != "PROC"]
            if finished or arrived:
                with self._cond:
                    self._watches = [w for w in self._watches if all(w is not f for f, _ in finished)]
                for watch, outcome in finished:
                    self._finish(watch, None if outcome == "DONE" else outcome)
                backoff = MIN_BACKOFF_S
            else:
                with self._cond:
                    self._cond.wait(timeout=backoff)
                backoff = min(2 * backoff, MAX_BACKOFF_S)
        for watch in remaining:
            self._finish(watch, "endpoint closed")

    def _deliver(self, arrived: dict[str, list[bytes]]) -> None:
        try:
            self._on_notifs(arrived)
        except Exception:
            log.exception("%s: handling notifications failed", self._agent.name)

    def _outcome(self, watch: _Watch) -> str:
        state = self._agent.state(watch.xfer)
        if state == "ERR":
            return "transfer error reported by NIXL"
        if state == "PROC" and time.monotonic() > watch.deadline:
            return "transfer timed out"
        return state

    def _finish(self, watch: _Watch, failure: str | None) -> None:
        self._agent.release_xfer(watch.xfer)
        try:
            if failure is None:
                watch.on_done()
            else:
                watch.on_fail(failure)
        except Exception:
            log.exception("%s: completion callback failed", self._agent.name)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
