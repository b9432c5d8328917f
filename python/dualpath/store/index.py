"""The per-key index of the block store: one small entry file per block, naming where its data lies.

``<namespace>/blocks/<k[:2]>/<key>.kv`` (:func:`entry_path`, the only place that spells it) exists iff the
block is stored and readable, so an existence test stays one ``stat``; :class:`StoreIndex` is that test
for other packages (the router's hit estimates), read-only. The entry holds the segment file
and offset of the block's data as text. It is written to a private temporary file, made durable, then
published with ``link()``, which fails if the key exists: the first writer wins, across processes and
hosts, and nobody ever sees a half-written entry. Segment names are never reused and offsets within a
segment never rewritten, so an entry's content identifies one block for all time: removal compares it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from dualpath.interprocess import dead_local_writer, writer_tag
from dualpath.store.blockfile import CorruptBlock

BLOCKS = "blocks"  # <root>/<namespace>/blocks holds a namespace's index


def entry_path(blocks_dir: str | Path, key: str) -> str:
    """The index entry of ``key`` under ``blocks_dir``: it exists iff the block is stored."""
    return f"{blocks_dir}/{key[:2]}/{key}.kv"


class Entry(NamedTuple):
    segment: str
    offset: int

    def encode(self) -> bytes:
        return f"{self.segment} {self.offset}\n".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        try:
            segment, offset = raw.decode().split()
            entry = cls(segment, int(offset))
        except ValueError:
            raise CorruptBlock(f"unreadable index entry {raw[:80]!r}") from None
        if "/" in segment or entry.offset < 0:
            raise CorruptBlock(f"index entry points outside the store: {raw[:80]!r}")
        return entry


def _nonce() -> str:
    return f"{writer_tag()}.{os.urandom(6).hex()}"


class Index:
    """Entries of one namespace; ``tmp`` holds entries being written and entries being removed."""

    def __init__(self, blocks_dir: Path, tmp_dir: Path, durable: bool) -> None:
        self.blocks_dir = blocks_dir
        self.tmp_dir = tmp_dir
        self.durable = durable

    def path(self, key: str) -> Path:
        return Path(entry_path(self.blocks_dir, key))

    def exists(self, key: str) -> bool:
        return os.path.exists(entry_path(self.blocks_dir, key))

    def resolve(self, key: str) -> bytes | None:
        """The raw entry of ``key``, or None if it is not stored."""
        try:
            fd = os.open(entry_path(self.blocks_dir, key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.read(fd, 512)
        finally:
            os.close(fd)

    def publish(self, key: str, entry: Entry) -> bool:
        """Make ``key`` point at ``entry``; False if the key is already stored (another writer won)."""
        tmp = self.tmp_dir / f"{key}.{_nonce()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, entry.encode())
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            final = self.path(key)
            final.parent.mkdir(exist_ok=True)
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def sync(self, keys: list[str]) -> None:
        """Make the publication of ``keys`` durable (one fsync per fan-out directory)."""
        if self.durable:
            for prefix in sorted({key[:2] for key in keys}):
                _fsync_dir(self.blocks_dir / prefix)

    def take(self, key: str, free: Callable[[bytes], None], expected: bytes | None = None) -> bool:
        """Remove the entry of ``key`` and ``free`` its block; False if absent (or not ``expected``).

        ``rename`` hands the entry to exactly one remover, so only that one frees the block's data; the
        ticket outlives the freeing, so a remover that dies midway leaves it for ``dead_tmp_files``.
        With ``expected``, an entry that was replaced since it was read is put back and left alone.
        """
        ticket = self.tmp_dir / f"{key}.{_nonce()}.taken"
        try:
            os.rename(self.path(key), ticket)
        except FileNotFoundError:
            return False
        try:
            raw = ticket.read_bytes()
            if expected is not None and raw != expected:
                try:
                    os.link(ticket, self.path(key))
                    return False
                except FileExistsError:
                    pass  # a newer entry took the name meanwhile: the one we hold is garbage now
            free(raw)
            return expected is None or raw == expected
        finally:
            ticket.unlink(missing_ok=True)

    def scan(self) -> Iterator[os.DirEntry]:
        """Every published entry (as directory entries of their files)."""
        with os.scandir(self.blocks_dir) as fanout:
            for sub in fanout:
                if sub.is_dir(follow_symlinks=False):
                    with os.scandir(sub.path) as files:
                        yield from (e for e in files if e.name.endswith(".kv"))

    def dead_tmp_files(self) -> Iterator[Path]:
        """Temporary files of this host's writers and removers whose process has died:
        ``<key>.<host>-<pid>.<nonce>.<kind>`` (another host's are left to that host)."""
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            if len(parts) >= 4 and dead_local_writer(parts[-3]):
                yield Path(entry.path)


class StoreIndex:
    """The store's published read-only view, for processes that do not take part in it (a router on any host
    that mounts the store): which blocks are stored. It opens nothing for writing and creates nothing, so it
    is safe on a store that does not exist yet."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def namespaces(self) -> list[str]:
        """The namespaces (one model and block size each, ``StoreConfig.namespace``) that hold an index."""
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / BLOCKS).is_dir())
        except FileNotFoundError:
            return []

    def holds(self, key: str, namespace: str) -> bool:
        return os.path.exists(entry_path(f"{self.root}/{namespace}/{BLOCKS}", key))

    def stored_prefix(self, keys: Sequence[str], namespace: str) -> int:
        """How many leading ``keys`` are stored: ``BlockStore.prefix_length`` in log2(n) lookups.

        A binary search: a chain's blocks are written in order and every hit refreshes all its leading
        blocks for LRU eviction, so the stored blocks of a chain form a prefix.
        """
        blocks_dir = f"{self.root}/{namespace}/{BLOCKS}"
        low, high = 0, len(keys)  # keys[:low] are stored; keys[high:] are not
        while low < high:
            mid = (low + high) // 2
            if os.path.exists(entry_path(blocks_dir, keys[mid])):
                low = mid + 1
            else:
                high = mid
        return low


def drop_all_blocks(root: str | Path) -> None:
    """Unpublish every block of every namespace under ``root`` (a test harness resetting its own store to
    cold; segment data is left for the store's orphan collection)."""
    for namespace in StoreIndex(root).namespaces():
        for fanout in (Path(root) / namespace / BLOCKS).iterdir():
            shutil.rmtree(fanout, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
