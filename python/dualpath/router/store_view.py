"""A read-only view of the shared block store: how much of a prompt is stored, and each node's read queue.

The router must not take part in the store: a ``BlockStore`` handle claims a slot in its node's state
file, starts I/O threads and creates directories, and a ``NodeState`` creates the node's file. This view
only looks: block files are checked by path (the store's layout, ``<root>/<namespace>/blocks/<k[:2]>/<k>.kv``)
and node state files are mapped read-only and summed the way ``NodeState.snapshot`` sums them.

Block keys are chained SHA-256 (``dualpath.kv.block_keys``, SGLang's page keys). An agent resends its
whole conversation every turn, so all but the last few blocks of a prompt were keyed on an earlier turn:
``KeyMemo`` runs a parallel chain of xxh3-64 over spans of ``SPAN`` blocks (each span's hash seeded with
the previous one, so that it names the whole prefix, like a key) and maps it to the span's keys. A known
span costs one fast hash and a dict lookup; only the blocks from the first unknown span on go through
``block_keys``. A 64-bit collision would only mislead the router's hit *estimate*; engines look up exactly.
"""

from __future__ import annotations

import mmap
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from dualpath.interprocess import pid_alive
from dualpath.kv import block_keys
from dualpath.store.node import _FILE_BYTES, _HEADER, _MAGIC, _SLOT, SLOTS, ReadQueue

SPAN = 8  # blocks per memo entry: few Python steps per prompt, at most SPAN - 1 blocks re-keyed per turn
DEFAULT_CAPACITY = 1 << 14  # spans: 131K blocks, the prefixes of a few hundred 32K-token sessions (~16 MB)


class KeyMemo:
    """Remembers the keys of up to ``capacity`` prefix spans (and forgets them all when it is full)."""

    def __init__(self, block_tokens: int, capacity: int = DEFAULT_CAPACITY) -> None:
        if block_tokens <= 0 or capacity <= 0:
            raise ValueError(f"block_tokens and capacity must be positive, got {block_tokens}, {capacity}")
        self.block_tokens = block_tokens
        self.capacity = capacity
        self._spans: dict[int, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self._spans)

    def keys(self, ids: array) -> list[str]:
        """The keys of every complete block of the uint32 token ids ``ids``: ``block_keys(ids, block_tokens)``."""
        tokens = np.frombuffer(ids, dtype=np.uint32)
        data = memoryview(tokens).cast("B")
        span_tokens = SPAN * self.block_tokens
        step = span_tokens * tokens.itemsize
        prefix_hashes = []
        prefix_hash = 0
        for start in range(0, len(tokens) // span_tokens * step, step):
            prefix_hash = xxhash.xxh3_64_intdigest(data[start:start + step], prefix_hash)
            prefix_hashes.append(prefix_hash)
        keys: list[str] = []
        for prefix_hash in prefix_hashes:
            span = self._spans.get(prefix_hash)
            if span is None:
                break
            keys += span
        known = len(keys) // SPAN
        fresh = block_keys(tokens[known * span_tokens:], self.block_tokens, prior_key=keys[-1] if keys else None)
        new_spans = prefix_hashes[known:]
        if len(self._spans) + len(new_spans) > self.capacity:
            self._spans.clear()
        # A prompt longer than the whole memo keeps its leading spans.
        for index, prefix_hash in enumerate(new_spans[:self.capacity - len(self._spans)]):
            self._spans[prefix_hash] = tuple(fresh[index * SPAN:(index + 1) * SPAN])
        return keys + fresh


class _NodeFile:
    """One node's state file, mapped read-only."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < _FILE_BYTES:
                raise FileNotFoundError(f"{path} is not initialised yet")
            self._map = mmap.mmap(fd, _FILE_BYTES, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the file
        self._header = np.frombuffer(self._map, _HEADER, count=1)
        self._slots = np.frombuffer(self._map, _SLOT, count=SLOTS, offset=_HEADER.itemsize)

    def snapshot(self, node: str) -> ReadQueue:
        header, slots = self._header[0].copy(), self._slots.copy()
        if header["magic"] != _MAGIC:
            return empty_queue(node)
        live = np.array([pid != 0 and pid_alive(int(pid)) for pid in slots["pid"]], dtype=bool)
        rate = float(header["rate"])
        return ReadQueue(
            node=node,
            queued_tokens=int(slots["queued_tokens"][live].sum()),
            queued_bytes=int(slots["queued_bytes"][live].sum()),
            inflight_tokens=int(slots["inflight_tokens"][live].sum()),
            inflight_bytes=int(slots["inflight_bytes"][live].sum()),
            read_tokens=int(slots["read_tokens"].sum() + header["retired_tokens"]),
            read_bytes=int(slots["read_bytes"].sum() + header["retired_bytes"]),
            rate_bytes_per_s=rate or None,
        )

    def close(self) -> None:
        del self._header, self._slots
        self._map.close()


def empty_queue(node: str) -> ReadQueue:
    return ReadQueue(node, 0, 0, 0, 0, 0, 0, None)


class StoreView:
    """What the router reads from the store at ``root``; every method is safe on a store that does not exist."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._memos: dict[int, KeyMemo] = {}
        self._nodes: dict[str, _NodeFile] = {}

    def stored_blocks(self, keys: Sequence[str], namespace: str) -> int:
        """How many leading ``keys`` are stored.

        A binary search over file existence: a chain's blocks are written in order and every hit refreshes
        all its leading blocks for LRU eviction, so the stored blocks of a chain form a prefix and this
        equals ``BlockStore.prefix_length`` with log2(n) lookups instead of n.
        """
        directory = f"{self.root}/{namespace}/blocks"
        low, high = 0, len(keys)  # keys[:low] are stored; keys[high:] are not
        while low < high:
            mid = (low + high) // 2
            key = keys[mid]
            if os.path.exists(f"{directory}/{key[:2]}/{key}.kv"):  # strings: pathlib costs more than the stat
                low = mid + 1
            else:
                high = mid
        return low

    def hit_tokens(self, token_ids: array, namespace: str, block_tokens: int) -> int:
        """Tokens of the uint32 ``token_ids`` whose Full Blocks are stored in ``namespace`` (whole blocks from
        the start; a namespace is one model and block size, ``StoreConfig.namespace``)."""
        memo = self._memos.get(block_tokens)
        if memo is None:
            memo = self._memos[block_tokens] = KeyMemo(block_tokens)
        return self.stored_blocks(memo.keys(token_ids), namespace) * block_tokens

    def read_queue(self, node: str) -> ReadQueue:
        """The node's storage-read queue and lifetime read totals; all zero while the node has no state file."""
        state = self._nodes.get(node)
        if state is None:
            try:
                state = self._nodes[node] = _NodeFile(self.root / "nodes" / f"{node}.state")
            except FileNotFoundError:
                return empty_queue(node)
        return state.snapshot(node)

    def close(self) -> None:
        for state in self._nodes.values():
            state.close()
        self._nodes.clear()
