"""Capacity accounting and LRU eviction for one store namespace, safe across processes.

Usage is a counter in a small file updated under an exclusive lock: writers add before publishing a
block and deleters subtract. The counter can drift if a process dies between the two, so every
eviction recounts the index entries (live blocks times the block's size in a segment), which are the
truth. Recency is the entry's mtime, touched on every read; eviction removes the oldest entries (and
frees their blocks) until usage is back under ``evict_to`` bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from dualpath.interprocess import FileLock
from dualpath.store.index import Index


class Evicted(NamedTuple):
    blocks: int
    bytes: int


class NoSpace(Exception):
    """A block cannot fit even after evicting everything evictable."""


class Capacity:
    def __init__(self, directory: Path, index: Index, block_bytes: int, free: Callable[[bytes], None],
                 limit: int | None, evict_to: int | None) -> None:
        self.limit = limit
        self.evict_to = evict_to if evict_to is not None else limit
        self._index = index
        self._block_bytes = block_bytes
        self._free = free
        self._fd = os.open(directory / "usage", os.O_RDWR | os.O_CREAT, 0o644)
        self._exclusive = FileLock(self._fd)
        with self._exclusive:
            if os.fstat(self._fd).st_size != 8:
                self._store(self._recount())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _load(self) -> int:
        return int.from_bytes(os.pread(self._fd, 8, 0), "little", signed=True)

    def _store(self, usage: int) -> None:
        os.pwrite(self._fd, max(usage, 0).to_bytes(8, "little", signed=True), 0)

    def _recount(self) -> int:
        return sum(1 for _ in self._index.scan()) * self._block_bytes

    @property
    def usage(self) -> int:
        with self._exclusive:
            return self._load()

    def reserve(self, nbytes: int) -> Evicted:
        """Account ``nbytes`` about to be published, evicting LRU blocks first if they would not fit."""
        with self._exclusive:
            usage = self._load()
            evicted = Evicted(0, 0)
            if self.limit is not None and usage + nbytes > self.limit:
                if nbytes > self.limit:
                    raise NoSpace(f"a {nbytes}-byte block exceeds the store capacity of {self.limit} bytes")
                evicted = self._evict_locked(min(self.evict_to, self.limit - nbytes))
                usage = self._load()
                if usage + nbytes > self.limit:
                    raise NoSpace(f"store full: {usage} of {self.limit} bytes in use after eviction")
            self._store(usage + nbytes)
            return evicted

    def release(self, nbytes: int) -> None:
        with self._exclusive:
            self._store(self._load() - nbytes)

    def evict(self, target_usage: int) -> Evicted:
        """Remove least-recently-used blocks until usage <= ``target_usage``."""
        with self._exclusive:
            return self._evict_locked(target_usage)

    def _evict_locked(self, target_usage: int) -> Evicted:
        entries = []
        for entry in self._index.scan():
            with suppress(FileNotFoundError):
                entries.append((entry.stat().st_mtime_ns, entry.name.removesuffix(".kv")))
        usage = len(entries) * self._block_bytes
        freed = 0
        for _, key in sorted(entries):
            if usage <= target_usage:
                break
            # An entry removed by someone else since the scan no longer counts either way.
            freed += self._index.take(key, self._free)
            usage -= self._block_bytes
        self._store(usage)
        return Evicted(freed, freed * self._block_bytes)
