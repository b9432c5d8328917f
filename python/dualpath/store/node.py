"""Per-node storage-NIC state shared by every process that claims the node: bandwidth cap and read queue.

One small memory-mapped file per node, on the host (:func:`node_dir`), never on the shared store mount: a
node is one host's storage NIC, and two hosts that mount the same store emulate their own. The header holds
the NIC rate and the time at which the emulated NIC is next free; reservations advance that time under an
exclusive lock (GCRA: a strict rate with no banked burst, so any one-second window carries at most the
configured bytes). Each process instance owns
one slot of counters and is its only writer; readers sum the slots of live processes, so a process that
dies with reads queued leaves no phantom load behind.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dualpath.interprocess import FileLock, pid_alive

log = logging.getLogger(__name__)

_MAGIC = 0x44504E4F44450001
_HEADER = np.dtype(
    [("magic", "<u8"), ("rate", "<f8"), ("next_free_ns", "<i8"), ("retired_tokens", "<i8"),
     ("retired_bytes", "<i8"), ("pad", "<i8", 3)]
)
_SLOT = np.dtype(
    [("pid", "<i8"), ("reserved", "<i8"), ("queued_tokens", "<i8"), ("queued_bytes", "<i8"),
     ("inflight_tokens", "<i8"), ("inflight_bytes", "<i8"), ("read_tokens", "<i8"), ("read_bytes", "<i8")]
)
_FILE_BYTES = 8192
SLOTS = (_FILE_BYTES - _HEADER.itemsize) // _SLOT.itemsize


class ReadQueue(NamedTuple):
    """A node's storage-read load, summed over its live processes, plus lifetime totals."""

    node: str
    queued_tokens: int
    queued_bytes: int
    inflight_tokens: int
    inflight_bytes: int
    read_tokens: int
    read_bytes: int
    rate_bytes_per_s: float | None

    @classmethod
    def idle(cls, node: str) -> ReadQueue:
        """The queue of a node with no state yet: nothing queued, nothing read, no cap."""
        return cls(node, 0, 0, 0, 0, 0, 0, None)

    @property
    def pending_tokens(self) -> int:
        return self.queued_tokens + self.inflight_tokens

    @property
    def pending_bytes(self) -> int:
        return self.queued_bytes + self.inflight_bytes


STORE_ID = ".dualpath-store-id"


def store_id(root: Path) -> str:
    """The store's identity, created once by whichever process gets there first: every host and every path to
    the store (a symlink, a bind mount) reads the same id, and a store recreated at a reused inode gets a new one."""
    path = root / STORE_ID
    try:
        return path.read_text()
    except FileNotFoundError:
        pass
    with tempfile.NamedTemporaryFile("w", dir=root, prefix=f"{STORE_ID}.", delete=False) as draft:
        draft.write(uuid.uuid4().hex)
    try:
        os.link(draft.name, path)  # atomic publish: a reader never sees a half-written id
    except FileExistsError:
        pass  # another process published first; its id wins
    finally:
        os.unlink(draft.name)
    return path.read_text()


def node_dir(root: Path) -> Path:
    """Where this host keeps the node state files of the store at ``root``: host-local, one directory per
    store (named by :func:`store_id`)."""
    return Path(tempfile.gettempdir()) / f"dualpath-{os.getuid()}" / "nodes" / store_id(root)


def _sum(node: str, header: np.ndarray, slots: np.ndarray) -> ReadQueue:
    """A node's queue: the counters of its live processes' slots, the read totals of all (dead ones retired)."""
    if header["magic"] != _MAGIC:  # a file being initialised
        return ReadQueue.idle(node)
    live = np.array([pid != 0 and pid_alive(int(pid)) for pid in slots["pid"]], dtype=bool)
    return ReadQueue(
        node=node,
        queued_tokens=int(slots["queued_tokens"][live].sum()),
        queued_bytes=int(slots["queued_bytes"][live].sum()),
        inflight_tokens=int(slots["inflight_tokens"][live].sum()),
        inflight_bytes=int(slots["inflight_bytes"][live].sum()),
        read_tokens=int(slots["read_tokens"].sum() + header["retired_tokens"]),
        read_bytes=int(slots["read_bytes"].sum() + header["retired_bytes"]),
        rate_bytes_per_s=float(header["rate"]) or None,
    )


class Reservation(NamedTuple):
    start_ns: int
    finish_ns: int


def sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / 1e9)


class NodeState:
    """This process's handle on one node's shared NIC and read-queue state."""

    def __init__(self, directory: Path, node: str, rate_bytes_per_s: float | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.node = node
        self._fd = os.open(directory / f"{node}.state", os.O_RDWR | os.O_CREAT, 0o644)
        self._exclusive = FileLock(self._fd)
        self._counters_lock = threading.Lock()
        try:
            with self._exclusive:
                if os.fstat(self._fd).st_size < _FILE_BYTES:
                    os.ftruncate(self._fd, _FILE_BYTES)
                self._map = mmap.mmap(self._fd, _FILE_BYTES)
                self._header = np.frombuffer(self._map, _HEADER, count=1)[0:1]
                self._slots = np.frombuffer(self._map, _SLOT, count=SLOTS, offset=_HEADER.itemsize)
                if self._header["magic"][0] != _MAGIC:
                    self._header[0] = (_MAGIC, 0.0, 0, 0, 0, (0, 0, 0))
                self._retire_dead_slots()
                self._slot = self._claim_slot()
                if rate_bytes_per_s is not None:
                    self._set_rate(rate_bytes_per_s)
        except BaseException:
            if hasattr(self, "_map"):
                self.__dict__.pop("_header", None)
                self.__dict__.pop("_slots", None)
                self._map.close()
            os.close(self._fd)
            raise

    def _retire_dead_slots(self) -> None:
        for slot in np.flatnonzero(self._slots["pid"]):
            if not pid_alive(int(self._slots["pid"][slot])):
                self._retire(slot)

    def _retire(self, slot: int) -> None:
        self._header["retired_tokens"] += self._slots["read_tokens"][slot]
        self._header["retired_bytes"] += self._slots["read_bytes"][slot]
        self._slots[slot] = 0

    def _claim_slot(self) -> int:
        free = np.flatnonzero(self._slots["pid"] == 0)
        if free.size == 0:
            raise RuntimeError(f"node {self.node!r} already has {SLOTS} live store handles")
        slot = int(free[0])
        self._slots[slot] = 0
        self._slots["pid"][slot] = os.getpid()
        return slot

    def _set_rate(self, rate: float) -> None:
        previous = float(self._header["rate"][0])
        if previous != rate and previous:
            log.warning("node %s: storage NIC rate changed from %.3g to %.3g B/s", self.node, previous, rate)
        self._header["rate"] = rate

    @property
    def rate_bytes_per_s(self) -> float | None:
        rate = float(self._header["rate"][0])
        return rate or None

    def reserve(self, nbytes: int) -> Reservation:
        """Book ``nbytes`` on the node's NIC: the caller may start at ``start_ns`` and is done by ``finish_ns``."""
        now = time.monotonic_ns()
        rate = self.rate_bytes_per_s
        if rate is None:
            return Reservation(now, now)
        with self._exclusive:
            start = max(now, int(self._header["next_free_ns"][0]))
            finish = start + int(nbytes * 1e9 / rate)
            self._header["next_free_ns"] = finish
        return Reservation(start, finish)

    def _add(self, **deltas: int) -> None:
        with self._counters_lock:
            for field, delta in deltas.items():
                self._slots[field][self._slot] += delta

    def queued(self, tokens: int, nbytes: int) -> None:
        self._add(queued_tokens=tokens, queued_bytes=nbytes)

    def dequeued(self, tokens: int, nbytes: int) -> None:
        """Queued reads that will not happen (misses, failures before the NIC)."""
        self._add(queued_tokens=-tokens, queued_bytes=-nbytes)

    def started(self, tokens: int, nbytes: int) -> None:
        self._add(queued_tokens=-tokens, queued_bytes=-nbytes, inflight_tokens=tokens, inflight_bytes=nbytes)

    def finished(self, tokens: int, nbytes: int, delivered: bool) -> None:
        done = {"read_tokens": tokens, "read_bytes": nbytes} if delivered else {}
        self._add(inflight_tokens=-tokens, inflight_bytes=-nbytes, **done)

    def snapshot(self) -> ReadQueue:
        return _sum(self.node, self._header[0].copy(), self._slots.copy())

    def close(self) -> None:
        if self._fd < 0:
            return
        with self._exclusive:
            self._retire(self._slot)
            self._map.flush()
        del self._header, self._slots
        self._map.close()
        os.close(self._fd)
        self._fd = -1


class NodeReader:
    """A read-only look at one node's state on this host (a server reporting its node's queue); all zero
    until a store handle of the node created the file."""

    def __init__(self, directory: Path, node: str) -> None:
        self.path = directory / f"{node}.state"
        self.node = node
        self._map: mmap.mmap | None = None

    def snapshot(self) -> ReadQueue:
        if self._map is None and not self._open():
            return ReadQueue.idle(self.node)
        header = np.frombuffer(self._map, _HEADER, count=1)[0].copy()
        slots = np.frombuffer(self._map, _SLOT, count=SLOTS, offset=_HEADER.itemsize).copy()
        return _sum(self.node, header, slots)

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size < _FILE_BYTES:
                return False
            self._map = mmap.mmap(fd, _FILE_BYTES, prot=mmap.PROT_READ)
            return True
        finally:
            os.close(fd)  # the mapping keeps the file

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
