"""A stand-in for ``hf3fs_fuse.io`` (hf3fs-py-usrbio) with POSIX pread/pwrite underneath.

It keeps the library's contract that the store relies on: files must be registered before I/O, data
moves only between a file and a registered shared-memory iovec, rings take prepared I/Os and return one
result per I/O (bytes moved, or a negative errno), and a path outside the mount is refused.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path


class _Result:
    def __init__(self, result: int) -> None:
        self.result = result


class _IoVec:
    def __init__(self, shm, mount: str) -> None:
        self.buf = shm.buf
        self.mount = mount

    def __getitem__(self, window: slice) -> memoryview:
        return self.buf[window]


class _Ring:
    def __init__(self, fake: FakeUsrbio, for_read: bool) -> None:
        self.fake = fake
        self.for_read = for_read
        self.prepared: list[tuple[memoryview, int, int]] = []

    def prepare(self, iov: memoryview, read: bool, fd: int, offset: int) -> None:
        if read != self.for_read:
            raise ValueError("I/O direction does not match the ring")
        if fd not in self.fake.registered:
            raise OSError(9, "fd not registered with USRBIO")
        self.prepared.append((iov, fd, offset))

    def submit(self) -> _Ring:
        return self

    def wait(self, min_results: int, timeout) -> list[_Result]:
        results = []
        for iov, fd, offset in self.prepared:
            self.fake.ios += 1
            try:
                moved = os.preadv(fd, [iov], offset) if self.for_read else os.pwritev(fd, [iov], offset)
            except OSError as exc:
                moved = -exc.errno
            results.append(_Result(moved))
        self.prepared.clear()
        return results


class FakeUsrbio(types.ModuleType):
    def __init__(self, mount: Path) -> None:
        super().__init__("hf3fs_fuse.io")
        self.mount = mount
        self.registered: set[int] = set()
        self.ios = 0

    def extract_mount_point(self, path: str) -> str:
        if not Path(path).resolve().is_relative_to(self.mount.resolve()):
            raise ValueError(f"{path} is not on a 3FS mount")
        return str(self.mount)

    def register_fd(self, fd: int) -> None:
        self.registered.add(fd)

    def deregister_fd(self, fd: int) -> None:
        self.registered.remove(fd)

    def make_ioring(self, mount: str, entries: int, for_read: bool, timeout: int, numa: int) -> _Ring:
        return _Ring(self, for_read)

    def make_iovec(self, shm, mount: str) -> _IoVec:
        return _IoVec(shm, mount)


def install(monkeypatch, mount: Path) -> FakeUsrbio:
    fake = FakeUsrbio(mount)
    package = types.ModuleType("hf3fs_fuse")
    package.io = fake
    monkeypatch.setitem(sys.modules, "hf3fs_fuse", package)
    monkeypatch.setitem(sys.modules, "hf3fs_fuse.io", fake)
    return fake
