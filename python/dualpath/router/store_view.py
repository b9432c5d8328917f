"""The router's hit estimates: how much of a prompt the shared block store holds.

The router must not take part in the store (a ``BlockStore`` handle claims a slot of its node's NIC, starts
I/O threads and creates directories): it looks through the store's published read-only interface,
:class:`dualpath.store.StoreIndex`, on its own host's mount of the store.

Block keys are chained SHA-256 (``dualpath.kv.block_keys``, SGLang's page keys). An agent resends its
whole conversation every turn, so all but the last few blocks of a prompt were keyed on an earlier turn:
``KeyMemo`` runs a parallel chain of xxh3-64 over spans of ``SPAN`` blocks (each span's hash seeded with
the previous one, so that it names the whole prefix, like a key) and maps it to the span's keys. A known
span costs one fast hash and a dict lookup; only the blocks from the first unknown span on go through
``block_keys``. A 64-bit collision would only mislead the router's hit *estimate*; engines look up exactly.
"""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import xxhash

from dualpath.kv import block_keys
from dualpath.store import StoreIndex

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


class PrefixProbe:
    """The stored prefix of one prompt whose ids grow: the router's tokenizer encodes a long prompt only while the
    store holds every page so far (``__call__``), then asks for the hit (``hit_tokens``). Each call keys and looks
    up only the pages that are new since the last one (a chain's stored pages form a prefix)."""

    def __init__(self, index: StoreIndex, memo: KeyMemo, namespace: str) -> None:
        self.index, self.memo, self.namespace = index, memo, namespace
        self.keys: list[str] = []
        self.stored = 0  # leading keys found in the store
        self.missed = False  # a key past them is not: nothing further can be

    def __call__(self, ids: array) -> bool:
        """Whether the store holds every full page of the uint32 ``ids`` (then the hit may go on past them)."""
        self._extend(ids)
        return not self.missed

    def hit_tokens(self, ids: array) -> int:
        self._extend(ids)
        return self.stored * self.memo.block_tokens

    def _extend(self, ids: array) -> None:
        block_tokens = self.memo.block_tokens
        if len(ids) // block_tokens <= len(self.keys):
            return
        if not self.keys:  # the first look: the memo has the keys of what earlier turns sent
            self.keys = self.memo.keys(ids)
        else:
            tokens = np.frombuffer(ids, dtype=np.uint32)[len(self.keys) * block_tokens:]
            self.keys += block_keys(tokens, block_tokens, prior_key=self.keys[-1])
        if not self.missed:
            self.stored += self.index.stored_prefix(self.keys[self.stored:], self.namespace)
            self.missed = self.stored < len(self.keys)


class _NothingStored:
    """The probe where the router has no store to look in (no ``--store-root`` or no namespace yet)."""

    def __call__(self, ids: array) -> bool:
        return False

    def hit_tokens(self, ids: array) -> int:
        return 0


NOTHING_STORED = _NothingStored()


class StoreView:
    """What the router reads from the store at ``root``; every method is safe on a store that does not exist."""

    def __init__(self, root: Path) -> None:
        self.index = StoreIndex(root)
        self._memos: dict[int, KeyMemo] = {}

    def probe(self, namespace: str, block_tokens: int) -> PrefixProbe:
        """A :class:`PrefixProbe` for one prompt in ``namespace``."""
        return PrefixProbe(self.index, self._memo(block_tokens), namespace)

    def hit_tokens(self, token_ids: array, namespace: str, block_tokens: int) -> int:
        """Tokens of the uint32 ``token_ids`` whose Full Blocks are stored in ``namespace`` (whole blocks from
        the start; a namespace is one model and block size, ``StoreConfig.namespace``)."""
        return self.index.stored_prefix(self._memo(block_tokens).keys(token_ids), namespace) * block_tokens

    def _memo(self, block_tokens: int) -> KeyMemo:
        memo = self._memos.get(block_tokens)
        if memo is None:
            memo = self._memos[block_tokens] = KeyMemo(block_tokens)
        return memo
