"""Capacity accounting and LRU eviction for one store namespace, safe across processes.

Usage is a counter in a small file updated under an exclusive lock: writers add before publishing a
block and deleters subtract. The counter can drift if a process dies between the two, so every
eviction recounts from the directory, which is the truth. Recency is the block file's mtime, touched on
every read; eviction removes the oldest files until usage is back under ``evict_to`` bytes.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from dualpath.interprocess import FileLock


class Evicted(NamedTuple):
    blocks: int
    bytes: int


class NoSpace(Exception):
    """A block cannot fit even after evicting everything evictable."""


def block_files(blocks_dir: Path) -> list[os.DirEntry]:
    entries = []
    with os.scandir(blocks_dir) as fanout:
        for sub in fanout:
            if sub.is_dir(follow_symlinks=False):
                with os.scandir(sub.path) as files:
                    entries.extend(e for e in files if e.name.endswith(".kv"))
    return entries


class Capacity:
    def __init__(self, directory: Path, blocks_dir: Path, limit: int | None, evict_to: int | None) -> None:
        self.limit = limit
        self.evict_to = evict_to if evict_to is not None else limit
        self._blocks_dir = blocks_dir
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
        total = 0
        for entry in block_files(self._blocks_dir):
            with suppress(FileNotFoundError):
                total += entry.stat().st_size
        return total

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
        files = []
        for entry in block_files(self._blocks_dir):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime_ns, stat.st_size, entry.path))
        usage = sum(size for _, size, _ in files)
        freed_blocks = freed_bytes = 0
        for _, size, path in sorted(files):
            if usage <= target_usage:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # deleted by someone else since the scan: it no longer counts either way
            else:
                freed_blocks += 1
                freed_bytes += size
            usage -= size
        self._store(usage)
        return Evicted(freed_blocks, freed_bytes)
