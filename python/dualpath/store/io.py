"""Data movers under the block store: POSIX (O_DIRECT preadv/pwritev) and 3FS USRBIO rings.

Both move a contiguous range of a segment file (one or many blocks) per call, between the file and a list
of page-aligned buffers. The store runs many such calls at once on its thread pool; the index, atomic
publication, checksums and eviction are the store's business, identical for both.
"""

from __future__ import annotations

import datetime
import errno
import os
import threading
from multiprocessing import shared_memory
from pathlib import Path
from typing import Protocol

import numpy as np

from dualpath.kv import PAGE, aligned_empty


class BlockIO(Protocol):
    direct: bool

    def readv(self, fd: int, buffers: list[np.ndarray], offset: int) -> int: ...

    def writev(self, fd: int, buffers: list[np.ndarray], offset: int) -> int: ...

    def open(self, path: Path, flags: int) -> int: ...

    def close(self, fd: int) -> None: ...

    def shutdown(self) -> None: ...


def supports_direct_io(directory: Path) -> bool:
    """Whether files in ``directory`` accept O_DIRECT (tmpfs and some FUSE mounts refuse it)."""
    probe = directory / f".direct-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        return os.pwrite(fd, aligned_empty(PAGE), 0) == PAGE
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class PosixIO:
    """preadv/pwritev on files opened with O_DIRECT (or buffered where the file system refuses it)."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct
        self._direct_flag = os.O_DIRECT if direct else 0

    def open(self, path: Path, flags: int) -> int:
        return os.open(path, flags | self._direct_flag, 0o644)

    def close(self, fd: int) -> None:
        os.close(fd)

    def readv(self, fd: int, buffers: list[np.ndarray], offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def writev(self, fd: int, buffers: list[np.ndarray], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def shutdown(self) -> None:
        pass


class _Ring:
    """One thread's USRBIO ring and the shared-memory iovec its I/O lands in."""

    def __init__(self, usrbio, mount: str, nbytes: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        try:
            self.read_ring = usrbio.make_ioring(mount, 1, for_read=True, timeout=1, numa=-1)
            self.write_ring = usrbio.make_ioring(mount, 1, for_read=False, timeout=1, numa=-1)
            self.iovec = usrbio.make_iovec(self.shm, mount)
        finally:
            # The iovec keeps its own mapping; unlinking now leaves nothing behind in /dev/shm.
            self.shm.unlink()
        self.view = np.frombuffer(self.shm.buf, dtype=np.uint8)

    def close(self) -> None:
        del self.view
        self.shm.close()


class UsrbioIO:
    """3FS user-space block I/O (hf3fs-py-usrbio): one ring per store thread, at most one block per submit."""

    direct = True

    def __init__(self, mount: Path, root: Path, max_file_bytes: int, timeout_s: float) -> None:
        try:
            from hf3fs_fuse import io as usrbio
        except ImportError as exc:
            raise RuntimeError(
                "the 3FS store backend needs hf3fs-py-usrbio (module hf3fs_fuse), built from "
                "deepseek-ai/3FS against the installed 3FS client; it is not importable here"
            ) from exc
        if not mount.is_dir():
            raise RuntimeError(f"3FS mount {mount} does not exist: mount 3FS there or unset hf3fs_mount")
        try:
            found = usrbio.extract_mount_point(str(root))
        except Exception as exc:
            raise RuntimeError(f"store root {root} is not on a 3FS mount ({exc})") from exc
        if Path(found).resolve() != mount.resolve():
            raise RuntimeError(f"store root {root} is on 3FS mount {found}, not on the configured {mount}")
        self._usrbio = usrbio
        self._mount = str(found)
        self._max_file_bytes = max_file_bytes
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._local = threading.local()
        self._rings: list[_Ring] = []
        self._rings_lock = threading.Lock()

    def _ring(self) -> _Ring:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            ring = self._local.ring = _Ring(self._usrbio, self._mount, self._max_file_bytes)
            with self._rings_lock:
                self._rings.append(ring)
        return ring

    def open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags, 0o644)
        try:
            self._usrbio.register_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self, fd: int) -> None:
        try:
            self._usrbio.deregister_fd(fd)
        finally:
            os.close(fd)

    def _submit(self, ring: _Ring, for_read: bool, fd: int, nbytes: int, offset: int) -> int:
        io_ring = ring.read_ring if for_read else ring.write_ring
        io_ring.prepare(ring.iovec[0:nbytes], for_read, fd, offset)
        (done,) = io_ring.submit().wait(min_results=1, timeout=self._timeout)
        if done.result < 0:
            raise OSError(-done.result, os.strerror(-done.result))
        return done.result

    def _pieces(self, buffers: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Consecutive buffers grouped to fill the iovec (one block file) per submit."""
        pieces: list[list[np.ndarray]] = [[]]
        size = 0
        for buffer in buffers:
            if pieces[-1] and size + buffer.nbytes > self._max_file_bytes:
                pieces.append([])
                size = 0
            pieces[-1].append(buffer)
            size += buffer.nbytes
        return pieces

    def readv(self, fd: int, buffers: list[np.ndarray], offset: int) -> int:
        ring = self._ring()
        total = 0
        for piece in self._pieces(buffers):
            size = sum(b.nbytes for b in piece)
            nread = self._submit(ring, True, fd, size, offset + total)
            position = 0
            for buffer in piece:
                buffer[:] = ring.view[position : position + buffer.nbytes]
                position += buffer.nbytes
            total += nread
            if nread < size:
                break
        return total

    def writev(self, fd: int, buffers: list[np.ndarray], offset: int) -> int:
        ring = self._ring()
        total = 0
        for piece in self._pieces(buffers):
            position = 0
            for buffer in piece:
                ring.view[position : position + buffer.nbytes] = buffer
                position += buffer.nbytes
            written = self._submit(ring, False, fd, position, offset + total)
            total += written
            if written < position:
                break
        return total

    def shutdown(self) -> None:
        with self._rings_lock:
            for ring in self._rings:
                ring.close()
            self._rings.clear()
