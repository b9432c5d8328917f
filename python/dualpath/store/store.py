"""The block store: Full Blocks by SGLang-compatible key, shared by the processes of a host (and by hosts).

Block data lives in append-only segment files; a per-key index entry names its segment and offset. A
write batch is appended contiguously, made durable, then each block is published by linking its entry,
which fails if the key already exists: readers only ever see complete blocks and concurrent writers of
one key cannot tear each other's data. A read batch resolves its entries, merges blocks that are
adjacent in one segment into one large I/O, and still books the node's emulated NIC and read queue
block by block. Every block's checksums are verified; anything torn, corrupted or freed under the
reader is a miss, counted, and damaged blocks are removed.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dualpath.kv import PAGE, as_bytes
from dualpath.kv.layout import address
from dualpath.store.blockfile import BlockFile, CorruptBlock, check_key, scratch
from dualpath.store.capacity import Capacity, Evicted, NoSpace
from dualpath.store.config import StoreConfig
from dualpath.store.index import BLOCKS, Entry, Index
from dualpath.store.io import BlockIO, PosixIO, UsrbioIO, supports_direct_io
from dualpath.store.node import NodeState, ReadQueue, node_dir, sleep_until
from dualpath.store.segments import Appender, OpenSegments, Segment, collect_orphans, free_range, punch_hole

log = logging.getLogger(__name__)

MAX_RUN_BYTES = 64 << 20  # one merged I/O at most; also bounds the iovec count (3 per block)
MAX_RUN_BLOCKS = 256


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


class _Read(NamedTuple):
    """One block of a read batch, resolved to its place in a segment."""

    key: str
    data: np.ndarray
    raw_entry: bytes
    entry: Entry
    future: Future[BlockStatus]


class BlockStore:
    """Full Blocks of one model and block size, read through one node's storage NIC."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.layout = config.layout
        self.format = BlockFile(self.layout)
        self.directory = config.root / config.namespace
        self.blocks_dir = self.directory / BLOCKS
        self.tmp_dir = self.directory / "tmp"
        self.segments_dir = self.directory / "segments"
        for directory in (self.blocks_dir, self.tmp_dir, self.segments_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.io = self._make_io(config)
        self.index = Index(self.blocks_dir, self.tmp_dir, config.durable)
        self._segments = OpenSegments(self.segments_dir, self.io)
        self._appender = Appender(self.segments_dir, self.io, config.segment_bytes)
        self._run_blocks = max(1, min(MAX_RUN_BLOCKS, MAX_RUN_BYTES // self.format.file_bytes))
        self._stats = StoreStats()
        self._stats_lock = threading.Lock()
        self._closed = False
        self._remove_orphans()
        limit = config.capacity_bytes
        evict_to = None if limit is None else int(limit * config.evict_to_fraction)
        self.capacity = Capacity(self.directory, self.index, self.format.file_bytes, self._free, limit, evict_to)
        try:
            self.node = NodeState(node_dir(config.root), config.node, config.nic_bytes_per_s)
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

    def _remove_orphans(self) -> None:
        # Dead processes' leftovers: unpublished entries, entries taken for removal whose block was not
        # freed yet, and the unpublished data in the segments they were appending to.
        for path in self.index.dead_tmp_files():
            if path.suffix == ".taken":
                with suppress(FileNotFoundError):
                    self._free(path.read_bytes())
            path.unlink(missing_ok=True)
        collect_orphans(self.segments_dir, self.index, self.format.file_bytes)

    def _free(self, raw_entry: bytes) -> None:
        """Free the data of an entry that has just been removed from the index."""
        with suppress(CorruptBlock):
            free_range(self.segments_dir, Entry.decode(raw_entry), self.format.file_bytes)

    # ---- keys and batches -----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The index entry of ``key``: it exists iff the block is stored."""
        return self.index.path(key)

    def prefix_length(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are in the store (SGLang's ``batch_exists``)."""
        for key in keys:
            check_key(key)
        for count, key in enumerate(keys):
            if not self.index.exists(key):
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

    def _runs(self, items: list, place) -> list[list]:
        """``items`` grouped into runs that are adjacent in one segment (``place(item)`` -> Entry)."""
        runs: list[list] = []
        for item in sorted(items, key=place):
            entry = place(item)
            if runs and len(runs[-1]) < self._run_blocks:
                last = place(runs[-1][-1])
                if last.segment == entry.segment and last.offset + self.format.file_bytes == entry.offset:
                    runs[-1].append(item)
                    continue
            runs.append([item])
        return runs

    # ---- reads ----------------------------------------------------------------------------------------

    def submit_read(self, keys: Sequence[str], buffers: Sequence[object]) -> list[Future[BlockStatus]]:
        """Start reading ``keys`` into page-aligned Full Block ``buffers``; one future per block.

        The whole batch is validated before anything is queued: a bad argument raises and reads nothing.
        """
        arrays = self._check_batch(keys, buffers, writable=True)
        tokens, nbytes = self.layout.block_tokens, self.format.data_bytes
        self.node.queued(tokens * len(keys), nbytes * len(keys))
        futures: list[Future[BlockStatus]] = [Future() for _ in keys]
        reads = []
        for key, data, future in zip(keys, arrays, futures, strict=True):
            try:
                raw = self.index.resolve(key)
                if raw is None:
                    self._not_read(future, BlockStatus.MISS)
                else:
                    reads.append(_Read(key, data, raw, Entry.decode(raw), future))
            except CorruptBlock as exc:
                self._not_read(future, self._damaged(key, raw, exc))
            except OSError:
                log.exception("store: cannot resolve block %s", key)
                self._not_read(future, BlockStatus.IO_ERROR)
        for run in self._runs(reads, lambda read: read.entry):
            self._pool.submit(self._read_run, run)
        return futures

    def read(self, keys: Sequence[str], buffers: Sequence[object]) -> list[BlockStatus]:
        """Read ``keys`` into ``buffers``; a buffer holds valid data only where the status is OK."""
        return [future.result() for future in self.submit_read(keys, buffers)]

    def _not_read(self, future: Future[BlockStatus], status: BlockStatus) -> None:
        self.node.dequeued(self.layout.block_tokens, self.format.data_bytes)
        self._count(misses=int(status is BlockStatus.MISS), corrupt=int(status is BlockStatus.CORRUPT),
                    read_errors=int(status is BlockStatus.IO_ERROR))
        future.set_result(status)

    def _read_run(self, run: list[_Read]) -> None:
        segment = run[0].entry.segment
        try:
            fd = self._segments.acquire(segment)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.exception("store: cannot open segment %s", segment)
            for read in run:  # a vanished segment means every block in it was evicted
                self._not_read(read.future, BlockStatus.MISS if isinstance(exc, FileNotFoundError)
                               else BlockStatus.IO_ERROR)
            return
        intact = True
        try:
            intact = self._read_locked(fd, run)
        finally:
            self._segments.release(segment, forget=not intact)

    def _read_locked(self, fd: int, run: list[_Read]) -> bool:
        # The run is one I/O, but the NIC books and the read queue tracks every block on its own: a block
        # is delivered (and its future completes) when its own booking finishes, as with one I/O per block.
        tokens, nbytes, file_bytes = self.layout.block_tokens, self.format.data_bytes, self.format.file_bytes
        bookings = [self.node.reserve(file_bytes) for _ in run]
        sleep_until(bookings[0].start_ns)
        for _ in run:
            self.node.started(tokens, nbytes)
        pages = scratch(len(run))
        nread = None
        try:
            iovecs = [v for read, page in zip(run, pages, strict=True) for v in self.format.iovecs(page, read.data)]
            nread = self.io.readv(fd, iovecs, run[0].entry.offset)
        except OSError:
            log.exception("store: reading %d blocks from segment %s failed", len(run), run[0].entry.segment)
        intact = True
        for position, (read, page, booking) in enumerate(zip(run, pages, bookings, strict=True)):
            status = BlockStatus.IO_ERROR
            if nread is not None:
                got = min(max(nread - position * file_bytes, 0), file_bytes)
                status = self._check(read, page, got)
            sleep_until(booking.finish_ns)
            self.node.finished(tokens, nbytes, delivered=status is BlockStatus.OK)
            if status is BlockStatus.OK:
                self._count(hits=1, bytes_read=nbytes)
            else:
                intact = False
                self._count(misses=int(status is BlockStatus.MISS), corrupt=int(status is BlockStatus.CORRUPT),
                            read_errors=int(status is BlockStatus.IO_ERROR))
            read.future.set_result(status)
        return intact

    def _check(self, read: _Read, pages, nread: int) -> BlockStatus:
        try:
            self.format.unpack(read.key, read.data, pages, nread)
        except CorruptBlock as exc:
            return self._damaged(read.key, read.raw_entry, exc)
        with suppress(FileNotFoundError):
            os.utime(self.index.path(read.key))  # LRU recency; readers never modify block data
        return BlockStatus.OK

    def _damaged(self, key: str, raw_entry: bytes, exc: CorruptBlock) -> BlockStatus:
        # Remove only the entry we read: if it is gone or replaced, the block was evicted (its space
        # punched) under us, which is a plain miss, not damage.
        if not self.index.take(key, self._free, expected=raw_entry):
            return BlockStatus.MISS
        self.capacity.release(self.format.file_bytes)
        log.warning("store: block %s is corrupt (%s); removed and reported as a miss", key, exc)
        return BlockStatus.CORRUPT

    # ---- writes ---------------------------------------------------------------------------------------

    def write(self, keys: Sequence[str], buffers: Sequence[object]) -> list[BlockStatus]:
        """Persist Full Blocks; EXISTS where the key is already stored (the first writer wins)."""
        arrays = self._check_batch(keys, buffers, writable=False)
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice in one write batch")
        statuses: list[BlockStatus | None] = [BlockStatus.EXISTS if self.index.exists(k) else None for k in keys]
        fresh = [i for i, status in enumerate(statuses) if status is None]
        self._count(writes_existing=len(keys) - len(fresh))
        if fresh:
            results = self._append([keys[i] for i in fresh], [arrays[i] for i in fresh])
            for i, status in zip(fresh, results, strict=True):
                statuses[i] = status
        return statuses  # type: ignore[return-value]

    def _append(self, keys: list[str], arrays: list[np.ndarray]) -> list[BlockStatus]:
        """Append new blocks contiguously to this process's segment, make them durable, publish them."""
        file_bytes = self.format.file_bytes
        try:
            segment, base = self._appender.reserve(file_bytes * len(keys))
        except OSError as exc:
            return [self._write_failed(key, exc) for key in keys]
        try:
            entries = [Entry(segment.name, base + i * file_bytes) for i in range(len(keys))]
            chunks = self._runs(list(range(len(keys))), lambda i: entries[i])
            outcomes = self._pool.map(lambda chunk: self._write_chunk(segment, entries, keys, arrays, chunk), chunks)
            errors: list[OSError | None] = [None] * len(keys)
            for chunk, failure in zip(chunks, outcomes, strict=True):
                for i in chunk:
                    errors[i] = failure
            if self.config.durable and any(error is None for error in errors):
                try:
                    os.fdatasync(segment.fd)
                except OSError as exc:
                    errors = [error or exc for error in errors]
            statuses = list(self._pool.map(self._publish, keys, entries, errors))
            for status, entry in zip(statuses, entries, strict=True):
                if status is not BlockStatus.OK:
                    punch_hole(segment.fd, entry.offset, file_bytes)  # never published: nobody reads it
            self.index.sync([key for key, status in zip(keys, statuses, strict=True) if status is BlockStatus.OK])
            return statuses
        finally:
            self._appender.done(segment)

    def _write_chunk(self, segment: Segment, entries: list[Entry], keys: list[str], arrays: list[np.ndarray],
                     chunk: list[int]) -> OSError | None:
        pages = scratch(len(chunk))
        iovecs = []
        for i, page in zip(chunk, pages, strict=True):
            self.format.pack(keys[i], arrays[i], page)
            iovecs.extend(self.format.iovecs(page, arrays[i]))
        expected = self.format.file_bytes * len(chunk)
        try:
            written = self.io.writev(segment.fd, iovecs, entries[chunk[0]].offset)
        except OSError as exc:
            return exc
        return None if written == expected else OSError(errno.EIO, f"short write: {written} of {expected} bytes")

    def _publish(self, key: str, entry: Entry, error: OSError | None) -> BlockStatus:
        if error is not None:
            return self._write_failed(key, error)
        try:
            evicted = self.capacity.reserve(self.format.file_bytes)
        except NoSpace as exc:
            log.warning("store: cannot write %s: %s", key, exc)
            self._count(write_failures=1)
            return BlockStatus.NO_SPACE
        self._count(evicted_blocks=evicted.blocks, evicted_bytes=evicted.bytes)
        try:
            published = self.index.publish(key, entry)
        except OSError as exc:
            self.capacity.release(self.format.file_bytes)
            return self._write_failed(key, exc)
        if not published:
            self.capacity.release(self.format.file_bytes)
            self._count(writes_existing=1)
            return BlockStatus.EXISTS
        self._count(writes=1, bytes_written=self.format.data_bytes)
        return BlockStatus.OK

    def _write_failed(self, key: str, exc: OSError) -> BlockStatus:
        self._count(write_failures=1)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.warning("store: file system full while writing %s", key)
            return BlockStatus.NO_SPACE
        log.error("store: writing block %s failed: %s", key, exc)
        return BlockStatus.IO_ERROR

    # ---- deletion, eviction, observability --------------------------------------------------------------

    def delete(self, keys: Sequence[str]) -> int:
        """Remove ``keys`` (absent ones are ignored); returns how many were removed."""
        for key in keys:
            check_key(key)
        removed = 0
        for key in keys:
            if self.index.take(key, self._free):
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
        self._appender.close()
        self._segments.close()
        self.io.shutdown()
        self.node.close()
        self.capacity.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
