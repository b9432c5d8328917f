"""Append-only segment files holding the store's block data, and the freeing of their space.

Each writing process appends to its own segment, ``<namespace>/segments/<host>-<pid>-<nonce>.seg``, and
reserves the blocks of one write batch as one contiguous range, so a prompt's blocks (written back in
key order) lie next to each other and read back as one large I/O. Files grow by ``fallocate`` in large
steps to keep their extents contiguous. A segment is never rewritten: a freed block becomes a hole
(``PUNCH_HOLE``), which reads as zeros and fails the block's checksums. A segment whose writer has moved
on is *sealed* (sticky mode bit: no appends any more); a sealed segment with no data left is unlinked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from dualpath.interprocess import dead_local_writer, writer_tag
from dualpath.store.blockfile import CorruptBlock
from dualpath.store.index import Entry, Index
from dualpath.store.io import BlockIO

SEALED = stat.S_ISVTX
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _PUNCH_HOLE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def has_data(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    return True


def dead_writer(name: str) -> bool:
    """Whether ``name`` is a segment of a writer on this host that no longer runs (never for other hosts)."""
    return dead_local_writer(name.removesuffix(".seg").rpartition("-")[0])


def seal_if_empty(path: Path, fd: int) -> None:
    """Unlink a sealed segment that holds no block any more (called after every change that may empty it)."""
    if os.fstat(fd).st_mode & SEALED and not has_data(fd):
        path.unlink(missing_ok=True)


def free_range(directory: Path, entry: Entry, nbytes: int) -> None:
    """Punch one block out of its segment, unlinking the segment if that was its last block."""
    path = directory / entry.segment
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        punch_hole(fd, entry.offset, nbytes)
        seal_if_empty(path, fd)
    finally:
        os.close(fd)


@dataclass
class Segment:
    name: str
    path: Path
    fd: int
    end: int = 0  # next append offset
    allocated: int = 0
    pending: int = 0  # write batches appending to it now
    retired: bool = False


class Appender:
    """This process's segment: hands out contiguous ranges, rolls over at ``segment_bytes``, seals."""

    def __init__(self, directory: Path, io: BlockIO, segment_bytes: int) -> None:
        self.directory = directory
        self.io = io
        self.segment_bytes = segment_bytes
        self.step = min(segment_bytes, 256 << 20)
        self._lock = threading.Lock()
        self._current: Segment | None = None

    def reserve(self, nbytes: int) -> tuple[Segment, int]:
        """A range of ``nbytes`` at the end of the current segment (OSError ENOSPC if it cannot grow)."""
        with self._lock:
            segment = self._current
            if segment is None or segment.end >= self.segment_bytes:
                if segment is not None:
                    self._retire(segment)
                name = f"{writer_tag()}-{os.urandom(6).hex()}.seg"
                path = self.directory / name
                segment = Segment(name, path, self.io.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL))
                self._current = segment
            offset = segment.end
            if offset + nbytes > segment.allocated:
                grow = max(offset + nbytes - segment.allocated, self.step)
                os.posix_fallocate(segment.fd, segment.allocated, grow)
                segment.allocated += grow
            segment.end += nbytes
            segment.pending += 1
            return segment, offset

    def done(self, segment: Segment) -> None:
        with self._lock:
            segment.pending -= 1
            if segment.retired and not segment.pending:
                self._seal(segment)

    def _retire(self, segment: Segment) -> None:
        segment.retired = True
        if not segment.pending:
            self._seal(segment)

    def _seal(self, segment: Segment) -> None:
        try:
            os.ftruncate(segment.fd, segment.end)  # give back the preallocated tail
            os.fchmod(segment.fd, os.fstat(segment.fd).st_mode | SEALED)
            seal_if_empty(segment.path, segment.fd)
        finally:
            self.io.close(segment.fd)

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._retire(self._current)
                self._current = None


class OpenSegments:
    """Per-process cache of segment files opened for reading, reference-counted across threads."""

    def __init__(self, directory: Path, io: BlockIO, limit: int = 64) -> None:
        self.directory = directory
        self.io = io
        self.limit = limit
        self._lock = threading.Lock()
        self._open: OrderedDict[str, list[int]] = OrderedDict()  # name -> [fd, users]

    def acquire(self, name: str) -> int:
        """An fd of segment ``name`` (FileNotFoundError once it is gone); pair with ``release``."""
        with self._lock:
            slot = self._open.get(name)
            if slot is None:
                slot = self._open[name] = [self.io.open(self.directory / name, os.O_RDONLY), 0]
            self._open.move_to_end(name)
            slot[1] += 1
            self._trim()
            return slot[0]

    def release(self, name: str, forget: bool = False) -> None:
        """Done with ``name``; ``forget`` closes it once unused (it lost a block: it may be going away)."""
        with self._lock:
            slot = self._open[name]
            slot[1] -= 1
            if forget:
                self._open.move_to_end(name, last=False)
                if not slot[1]:
                    self.io.close(self._open.pop(name)[0])
            self._trim()

    def _trim(self) -> None:
        idle = [name for name, (_, users) in self._open.items() if not users]
        for name in idle[: max(0, len(self._open) - self.limit)]:
            self.io.close(self._open.pop(name)[0])

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                self.io.close(fd)
            self._open.clear()


def collect_orphans(directory: Path, index: Index, block_bytes: int) -> None:
    """Segments of dead writers on this host: free what no entry refers to, seal them, unlink if empty.

    A writer killed mid-append leaves data that was never published (no entry refers to it); its
    published blocks stay readable until they are evicted like any other.
    """
    dead = []
    for item in os.scandir(directory):
        if item.name.endswith(".seg") and dead_writer(item.name):
            with suppress(FileNotFoundError):
                if not item.stat().st_mode & SEALED:
                    dead.append(item.name)
    if not dead:
        return
    live: dict[str, list[int]] = {name: [] for name in dead}
    for item in index.scan():
        try:
            entry = Entry.decode(Path(item.path).read_bytes())
        except (OSError, CorruptBlock):
            continue
        if entry.segment in live:
            live[entry.segment].append(entry.offset)
    for name, offsets in live.items():
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # collected by another process starting at the same time
        try:
            position = 0
            for offset in sorted(offsets):
                if offset > position:
                    punch_hole(fd, position, offset - position)
                position = offset + block_bytes
            os.ftruncate(fd, position)
            os.fchmod(fd, os.fstat(fd).st_mode | SEALED)
            seal_if_empty(path, fd)
        finally:
            os.close(fd)
