"""The block store: Full Blocks by SGLang-compatible key, one file per block, shared by processes and hosts.

A block is written to a private temporary file, made durable, then published with ``link()``, which
fails if the key already exists: readers only ever see complete blocks and concurrent writers of one key
cannot tear each other's data. Reads go through this process's node (emulated storage NIC and read
queue) and check the block's checksums; anything torn or corrupted is a miss, counted and removed.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dualpath.interprocess import pid_alive
from dualpath.kv import PAGE, as_bytes
from dualpath.kv.layout import address
from dualpath.store.blockfile import BlockFile, CorruptBlock, check_key, scratch
from dualpath.store.capacity import Capacity, Evicted, NoSpace
from dualpath.store.config import StoreConfig
from dualpath.store.io import BlockIO, PosixIO, UsrbioIO, supports_direct_io
from dualpath.store.node import NodeState, ReadQueue, sleep_until

log = logging.getLogger(__name__)


class BlockStatus(enum.Enum):
    OK = "ok"
    MISS = "miss"
    CORRUPT = "corrupt"
    EXISTS = "exists"
    NO_SPACE = "no_space"
    IO_ERROR = "io_error"


@dataclass
class StoreStats:
    """Counters of this process's store handle (node-wide read totals are in ``read_queue()``)."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    read_errors: int = 0
    bytes_read: int = 0
    writes: int = 0
    writes_existing: int = 0
    write_failures: int = 0
    bytes_written: int = 0
    evicted_blocks: int = 0
    evicted_bytes: int = 0


class BlockStore:
    """Full Blocks of one model and block size, read through one node's storage NIC."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.layout = config.layout
        self.format = BlockFile(self.layout)
        self.directory = config.root / config.namespace
        self.blocks_dir = self.directory / "blocks"
        self.tmp_dir = self.directory / "tmp"
        for directory in (self.blocks_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.io = self._make_io(config)
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._remove_orphan_tmp_files()
        limit = config.capacity_bytes
        evict_to = None if limit is None else int(limit * config.evict_to_fraction)
        self.capacity = Capacity(self.directory, self.blocks_dir, limit, evict_to)
        try:
            self.node = NodeState(config.root / "nodes", config.node, config.nic_bytes_per_s)
        except BaseException:
            self.capacity.close()
            raise
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix=f"store-{config.node}")

    def _make_io(self, config: StoreConfig) -> BlockIO:
        if config.hf3fs_mount is not None:
            return UsrbioIO(config.hf3fs_mount, config.root, self.format.file_bytes, config.hf3fs_timeout_s)
        direct = supports_direct_io(self.tmp_dir) if config.direct_io is None else config.direct_io
        if not direct and config.direct_io is None:
            log.warning("%s does not support O_DIRECT; the store uses buffered I/O", config.root)
        return PosixIO(direct)

    def _remove_orphan_tmp_files(self) -> None:
        # Temporary names are `<key>.<pid>.<nonce>.tmp`: a dead writer's file can never be published.
        for entry in os.scandir(self.tmp_dir):
            parts = entry.name.split(".")
            if len(parts) >= 4 and parts[-3].isdigit() and not pid_alive(int(parts[-3])):
                Path(entry.path).unlink(missing_ok=True)

    # ---- keys and files -------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.blocks_dir / key[:2] / f"{key}.kv"

    def prefix_length(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are in the store (SGLang's ``batch_exists``)."""
        for key in keys:
            check_key(key)
        for count, key in enumerate(keys):
            if not self.path(key).exists():
                return count
        return len(keys)

    def _check_batch(self, keys: Sequence[str], buffers: Sequence[object], writable: bool) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError("block store is closed")
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        arrays, addresses = [], set()
        for key, buffer in zip(keys, buffers, strict=True):
            check_key(key)
            data = as_bytes(buffer)
            if data.nbytes != self.format.data_bytes:
                raise ValueError(f"buffer for {key} has {data.nbytes} bytes, a Full Block has {self.format.data_bytes}")
            if address(data) % PAGE:
                raise ValueError(f"buffer for {key} is not {PAGE}-byte aligned (use dualpath.kv.BlockBuffer)")
            if writable and not data.flags.writeable:
                raise ValueError(f"buffer for {key} is read-only")
            if address(data) in addresses:
                raise ValueError(f"buffer for {key} is used twice in one batch")
            addresses.add(address(data))
            arrays.append(data)
        return arrays

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for field, delta in deltas.items():
                setattr(self._stats, field, getattr(self._stats, field) + delta)

    def stats(self) -> StoreStats:
        with self._stats_lock:
            return StoreStats(**asdict(self._stats))

    # ---- reads ----------------------------------------------------------------------------------------

    def submit_read(self, keys: Sequence[str], buffers: Sequence[object]) -> list[Future[BlockStatus]]:
        """Start reading ``keys`` into page-aligned Full Block ``buffers``; one future per block.

        The whole batch is validated before anything is queued: a bad argument raises and reads nothing.
        """
        arrays = self._check_batch(keys, buffers, writable=True)
        tokens, nbytes = self.layout.block_tokens, self.format.data_bytes
        self.node.queued(tokens * len(keys), nbytes * len(keys))
        return [self._pool.submit(self._read_one, key, data) for key, data in zip(keys, arrays, strict=True)]

    def read(self, keys: Sequence[str], buffers: Sequence[object]) -> list[BlockStatus]:
        """Read ``keys`` into ``buffers``; a buffer holds valid data only where the status is OK."""
        return [future.result() for future in self.submit_read(keys, buffers)]

    def _read_one(self, key: str, data: np.ndarray) -> BlockStatus:
        tokens, nbytes = self.layout.block_tokens, self.format.data_bytes
        try:
            fd = self.io.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            self.node.dequeued(tokens, nbytes)
            self._count(misses=1)
            return BlockStatus.MISS
        except OSError:
            self.node.dequeued(tokens, nbytes)
            log.exception("store: cannot open block %s", key)
            self._count(read_errors=1)
            return BlockStatus.IO_ERROR
        status = BlockStatus.IO_ERROR
        try:
            booking = self.node.reserve(self.format.file_bytes)
            sleep_until(booking.start_ns)
            self.node.started(tokens, nbytes)
            try:
                pages = scratch()
                nread = self.io.readv(fd, self.format.iovecs(pages, data))
                self.format.unpack(key, data, pages, nread)
                os.utime(fd)  # LRU recency; readers never modify block data
                status = BlockStatus.OK
            except CorruptBlock as exc:
                status = BlockStatus.CORRUPT
                log.warning("store: block %s is corrupt (%s); removed and reported as a miss", key, exc)
                self._quarantine(key, fd)
            except OSError:
                log.exception("store: reading block %s failed", key)
            finally:
                sleep_until(booking.finish_ns)
                self.node.finished(tokens, nbytes, delivered=status is BlockStatus.OK)
        finally:
            self.io.close(fd)
        if status is BlockStatus.OK:
            self._count(hits=1, bytes_read=nbytes)
        else:
            self._count(corrupt=int(status is BlockStatus.CORRUPT), read_errors=int(status is BlockStatus.IO_ERROR))
        return status

    def _quarantine(self, key: str, fd: int) -> None:
        # Only unlink the very file we read: it may have been evicted and rewritten since we opened it.
        path = self.path(key)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
                self.capacity.release(self.format.file_bytes)
        except FileNotFoundError:
            pass

    # ---- writes ---------------------------------------------------------------------------------------

    def write(self, keys: Sequence[str], buffers: Sequence[object]) -> list[BlockStatus]:
        """Persist Full Blocks; EXISTS where the key is already stored (the first writer wins)."""
        arrays = self._check_batch(keys, buffers, writable=False)
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice in one write batch")
        futures = [self._pool.submit(self._write_one, k, d) for k, d in zip(keys, arrays, strict=True)]
        return [future.result() for future in futures]

    def _write_one(self, key: str, data: np.ndarray) -> BlockStatus:
        final = self.path(key)
        if final.exists():
            self._count(writes_existing=1)
            return BlockStatus.EXISTS
        tmp = self.tmp_dir / f"{key}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
        try:
            self._write_file(tmp, key, data)
            evicted = self.capacity.reserve(self.format.file_bytes)
            self._count(evicted_blocks=evicted.blocks, evicted_bytes=evicted.bytes)
            final.parent.mkdir(exist_ok=True)
            try:
                os.link(tmp, final)
            except FileExistsError:
                self.capacity.release(self.format.file_bytes)
                self._count(writes_existing=1)
                return BlockStatus.EXISTS
            if self.config.durable:
                _fsync_dir(final.parent)
            self._count(writes=1, bytes_written=self.format.data_bytes)
            return BlockStatus.OK
        except NoSpace as exc:
            log.warning("store: cannot write %s: %s", key, exc)
            self._count(write_failures=1)
            return BlockStatus.NO_SPACE
        except OSError as exc:
            self._count(write_failures=1)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.warning("store: file system full while writing %s", key)
                return BlockStatus.NO_SPACE
            log.exception("store: writing block %s failed", key)
            return BlockStatus.IO_ERROR
        finally:
            tmp.unlink(missing_ok=True)

    def _write_file(self, tmp: Path, key: str, data: np.ndarray) -> None:
        pages = scratch()
        self.format.pack(key, data, pages)
        fd = self.io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            written = self.io.writev(fd, self.format.iovecs(pages, data))
            if written != self.format.file_bytes:
                raise OSError(errno.EIO, f"short write: {written} of {self.format.file_bytes} bytes")
            if self.config.durable:
                os.fsync(fd)
        finally:
            self.io.close(fd)

    # ---- deletion, eviction, observability --------------------------------------------------------------

    def delete(self, keys: Sequence[str]) -> int:
        """Remove ``keys`` (absent ones are ignored); returns how many were removed."""
        for key in keys:
            check_key(key)
        removed = 0
        for key in keys:
            try:
                self.path(key).unlink()
            except FileNotFoundError:
                continue
            self.capacity.release(self.format.file_bytes)
            removed += 1
        return removed

    def evict(self, target_usage: int) -> Evicted:
        """Evict least-recently-used blocks until the namespace uses at most ``target_usage`` bytes."""
        if target_usage < 0:
            raise ValueError(f"target_usage must be >= 0, got {target_usage}")
        evicted = self.capacity.evict(target_usage)
        self._count(evicted_blocks=evicted.blocks, evicted_bytes=evicted.bytes)
        return evicted

    def usage(self) -> int:
        return self.capacity.usage

    def read_queue(self) -> ReadQueue:
        """This node's storage-read load (all processes of the node), for the scheduler."""
        return self.node.snapshot()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self.io.shutdown()
        self.node.close()
        self.capacity.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
