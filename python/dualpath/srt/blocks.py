"""Full Block slots of one server: staging for store reads and for KV from peers, plus a read cache.

One page-aligned region (registered once with NIXL as the ``blocks`` grid) holds every block a server
moves: blocks read from the store on their way into SGLang's host pool, blocks a PE receives from a DE,
and blocks a DE forwards. Blocks read from the store stay cached (least recently used first out) while
their slot is not needed, so a DE that reads a prefix for its own decode and for the PE it forwards to
reads it through its storage NIC once. A slot is pinned while someone uses it.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
from dualpath.kv import BlockBuffer, BlockLayout
from dualpath.store import BlockStatus, BlockStore

SlotSource = Callable[[list[str], list[int]], list[bool]]  # writes the blocks it can into the slots, says which


def fill_missing(source: SlotSource, keys: list[str], slots: list[int], ok: list[bool]) -> list[bool]:
    """``ok`` with the blocks not ok yet asked of ``source`` (a source that tried first, then a fallback)."""
    rest = [i for i, done in enumerate(ok) if not done]
    if rest:
        for i, filled in zip(rest, source([keys[i] for i in rest], [slots[i] for i in rest]), strict=True):
            ok[i] = filled
    return ok


class SlotsExhausted(RuntimeError):
    """Every slot is pinned and none was released in time."""


class BlockSlots:
    def __init__(self, layout: BlockLayout, count: int, timeout_s: float) -> None:
        self.buffer = BlockBuffer(layout, count)
        self._timeout_s = timeout_s
        self._free = list(range(count))
        self._cached: OrderedDict[str, int] = OrderedDict()  # key -> slot holding its block
        self._cached_slots: set[int] = set()
        self._reading: set[str] = set()
        self._pins = [0] * count
        self._cond = threading.Condition()

    def block(self, slot: int) -> np.ndarray:
        return self.buffer.block(slot)

    def take(self, count: int) -> list[int]:
        """``count`` pinned slots for new data (cached blocks are given up, oldest first)."""
        with self._cond:
            return self._take(count)

    def pin(self, slots: Sequence[int]) -> None:
        """Pin slots the caller holds pinned once more (each pin is released on its own)."""
        with self._cond:
            for slot in slots:
                if self._pins[slot] == 0:
                    raise ValueError(f"slot {slot} is not pinned")
                self._pins[slot] += 1

    def release(self, slots: Sequence[int]) -> None:
        with self._cond:
            self._unpin(slots)

    def forget(self) -> None:
        """Drop every cached block (a cache flush); blocks in use stay until released, then free their slots."""
        with self._cond:
            for slot in self._cached.values():
                self._cached_slots.discard(slot)
                if self._pins[slot] == 0:
                    self._free.append(slot)
            self._cached.clear()
            self._cond.notify_all()

    def read(self, store: BlockStore, keys: Sequence[str]) -> list[int]:
        """:meth:`fill` from ``store``."""
        return self.fill(keys, self.from_store(store))

    def from_store(self, store: BlockStore) -> SlotSource:
        """A :meth:`fill` source that reads the blocks from ``store`` through this node's NIC."""
        def source(keys: list[str], slots: list[int]) -> list[bool]:
            statuses = store.read(keys, self.buffer.blocks(slots))
            return [status is BlockStatus.OK for status in statuses]

        return source

    def fill(self, keys: Sequence[str], source: SlotSource) -> list[int]:
        """Pinned slots holding the leading ``keys`` that are cached or that ``source`` could provide.

        ``source(keys, slots)`` writes the blocks it can into the slots and says which. Keys another
        caller is filling are waited for, not fetched twice. The result may be shorter than ``keys``: the
        first block that is missing ends it. Release the slots when done; the blocks stay cached until
        their slots are needed.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._reading.isdisjoint(keys), 3 * self._timeout_s)
            found = {key: self._cached[key] for key in keys if key in self._cached}
            for key, slot in found.items():
                self._pins[slot] += 1
                self._cached.move_to_end(key)
            missing = [key for key in keys if key not in found]
            try:
                fresh = self._take(len(missing)) if missing else []
            except SlotsExhausted:
                self._unpin(list(found.values()))
                raise
            self._reading.update(missing)
        filled: list[bool] = []
        try:
            filled = source(missing, fresh) if missing else []
        finally:
            with self._cond:
                self._reading.difference_update(missing)
                failed = []
                for key, slot, ok in zip(missing, fresh, filled or [False] * len(missing), strict=True):
                    if ok:
                        self._cached[key], found[key] = slot, slot
                        self._cached_slots.add(slot)
                    else:
                        failed.append(slot)
                leading = list(itertools.takewhile(found.__contains__, keys))
                self._unpin(failed + [found[key] for key in keys[len(leading):] if key in found])
        return [found[key] for key in leading]

    def _take(self, count: int) -> list[int]:
        if count > len(self._pins):
            raise ValueError(f"{count} blocks do not fit {len(self._pins)} staging slots")
        if not self._cond.wait_for(lambda: self._available() >= count, self._timeout_s):
            raise SlotsExhausted(f"no {count} free staging slots within {self._timeout_s} s")
        while len(self._free) < count:
            key = next(k for k, s in self._cached.items() if self._pins[s] == 0)
            slot = self._cached.pop(key)
            self._cached_slots.discard(slot)
            self._free.append(slot)
        slots = [self._free.pop() for _ in range(count)]
        for slot in slots:
            self._pins[slot] = 1
        return slots

    def _available(self) -> int:
        return len(self._free) + sum(1 for s in self._cached_slots if self._pins[s] == 0)

    def _unpin(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._pins[slot] -= 1
            if self._pins[slot] == 0 and slot not in self._cached_slots:
                self._free.append(slot)
        self._cond.notify_all()
