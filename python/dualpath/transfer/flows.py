"""One request's transfer, seen from each side: which layers have landed (receiver), which to post (sender)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dualpath.transfer.plans import Plan


class TransferFailed(RuntimeError):
    """A request's transfer failed (peer died, stalled, restarted or aborted): fall back or recompute."""

    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(f"transfer of request {request_id!r} failed: {reason}")
        self.request_id, self.reason = request_id, reason


class Inbound:
    """Receiver side: ``wait_layer(i)`` sleeps on a condition until layer ``i`` has landed.

    Layers are announced by the sender only after NIXL reports the write complete, which for UCX means
    the remote side has flushed it. Silence longer than ``stall_timeout_s`` fails the request.
    """

    def __init__(self, request_id: str, peer: str, layers: int, stall_timeout_s: float,
                 on_stall: Callable[[Inbound, str], None]) -> None:
        self.request_id, self.peer, self.layers = request_id, peer, layers
        self._stall_timeout_s, self._on_stall = stall_timeout_s, on_stall
        self._cond = threading.Condition()
        self._landed = np.zeros(layers, dtype=bool)
        self._last_progress = time.monotonic()
        self.failure: str | None = None

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Return once ``layer`` is in memory; raise :class:`TransferFailed` on failure, TimeoutError on ``timeout``."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layers})")
        self._wait(lambda: bool(self._landed[layer]), timeout)

    def wait_all(self, timeout: float | None = None) -> None:
        self._wait(lambda: bool(self._landed.all()), timeout)

    @property
    def complete(self) -> bool:
        with self._cond:
            return bool(self._landed.all())

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> None:
        give_up = None if timeout is None else time.monotonic() + timeout
        stalled = False
        with self._cond:
            while not ready() and self.failure is None:
                now = time.monotonic()
                stall_at = self._last_progress + self._stall_timeout_s
                if now >= stall_at:
                    stalled = True
                    break
                if give_up is not None and now >= give_up:
                    raise TimeoutError(f"request {self.request_id!r}: still waiting after {timeout} s")
                self._cond.wait(min(stall_at, give_up or stall_at) - now)
        if stalled:
            self._on_stall(self, f"no layer from {self.peer!r} for {self._stall_timeout_s} s")
        with self._cond:
            if self.failure is not None:
                raise TransferFailed(self.request_id, self.failure)

    def landed(self, layer: int) -> bool:
        """Record ``layer`` as landed; True when that completed the request."""
        with self._cond:
            self._landed[layer] = True
            self._last_progress = time.monotonic()
            self._cond.notify_all()
            return bool(self._landed.all())

    def fail(self, reason: str) -> None:
        with self._cond:
            if self.failure is None and not self._landed.all():
                self.failure = reason
            self._cond.notify_all()


class Outbound:
    """Sender side: post layers in any order with :meth:`send_layer`; :meth:`wait` for all to land.

    ``KVChannel.send_layer(layer, flows)`` posts one layer of several requests as one transfer.
    """

    def __init__(self, request_id: str, peer: str, layers: int, plan: Plan,
                 post: Callable[[int, list[Outbound]], None]) -> None:
        self.request_id, self.peer, self.layers, self.plan = request_id, peer, layers, plan
        self._post = post
        self._cond = threading.Condition()
        self._posted = np.zeros(layers, dtype=bool)
        self._done = np.zeros(layers, dtype=bool)
        self.in_flight: set[Any] = set()
        self.failure: str | None = None

    def send_layer(self, layer: int) -> None:
        self._post(layer, [self])

    def check_sendable(self, layer: int) -> None:
        """Raise unless ``layer`` may be posted now (in range, not sent yet, request not failed)."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layers})")
        with self._cond:
            if self.failure is not None:
                raise TransferFailed(self.request_id, self.failure)
            if self._posted[layer]:
                raise ValueError(f"layer {layer} of request {self.request_id!r} was already sent")

    def claim(self, layer: int) -> None:
        with self._cond:
            self._posted[layer] = True

    def send_all(self) -> None:
        for layer in range(self.layers):
            self.send_layer(layer)

    def wait(self, timeout: float | None = None) -> None:
        """Return when every layer is in the peer's memory; raise :class:`TransferFailed` on failure."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done.all() or self.failure is not None, timeout):
                raise TimeoutError(f"request {self.request_id!r}: not complete after {timeout} s")
            if self.failure is not None:
                raise TransferFailed(self.request_id, self.failure)

    @property
    def complete(self) -> bool:
        with self._cond:
            return bool(self._done.all())

    def landed(self, layer: int, xfer: Any) -> bool:
        """Record a finished layer; True when that completed the request."""
        with self._cond:
            self.in_flight.discard(xfer)
            self._done[layer] = True
            self._cond.notify_all()
            return bool(self._done.all())

    def track(self, xfer: Any) -> bool:
        """Remember a posted transfer; False when the request already failed (cancel it then)."""
        with self._cond:
            if self.failure is None:
                self.in_flight.add(xfer)
            return self.failure is None

    def detach(self) -> set[Any]:
        """Hand over the transfers still in flight, to cancel before the failure is reported."""
        with self._cond:
            in_flight, self.in_flight = self.in_flight, set()
            return in_flight

    def fail(self, reason: str) -> None:
        """Mark failed (the first reason wins) and wake the waiters."""
        with self._cond:
            if self.failure is None:
                self.failure = reason
            self._cond.notify_all()
