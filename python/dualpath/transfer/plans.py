"""Descriptor plans: built once per request with numpy, then one NIXL transfer per layer of many requests.

Posting a transfer has a fixed cost (a request object, a flush, a notification), so the channel posts
one layer of every request headed to the same peer as a single transfer: the plans' per-layer parts
are concatenated, never looped over block by block in Python.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol

import numpy as np

from dualpath.transfer.agent import KVAgent
from dualpath.transfer.grid import LayerBlockGrid, merged_pair_descs


class Plan(Protocol):
    """How to move each layer of one request; plans with equal ``key`` post together."""

    key: Hashable

    def layer_bytes(self, layer: int) -> int: ...

    def parts(self, layer: int) -> tuple[np.ndarray, np.ndarray]: ...

    def post(self, agent: KVAgent, parts: Sequence[tuple[np.ndarray, np.ndarray]], notif: bytes) -> tuple[Any, bool]:
        ...


class IndexedPlan:
    """Whole Layer Blocks: rows of descriptor lists prepared once per grid and peer (the hot path)."""

    def __init__(self, local: Any, remote: Any, src: LayerBlockGrid, src_slots: np.ndarray,
                 dst: LayerBlockGrid, dst_slots: np.ndarray) -> None:
        self.key = ("indexed", id(local), id(remote))
        self._local, self._remote = local, remote
        self._src_idx = [src.layer_indices(src_slots, layer) for layer in range(src.layers)]
        self._dst_idx = [dst.layer_indices(dst_slots, layer) for layer in range(dst.layers)]
        self._bytes = src_slots.size * src.layer_block_bytes

    def layer_bytes(self, layer: int) -> int:
        return self._bytes

    def parts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self._src_idx[layer], self._dst_idx[layer]

    def post(self, agent: KVAgent, parts: Sequence[tuple[np.ndarray, np.ndarray]], notif: bytes) -> tuple[Any, bool]:
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        return agent.post_indexed(self._local, src, self._remote, dst, notif)


class RangePlan:
    """Tokens ``[start, end)`` of every layer, partial blocks included, contiguous runs merged."""

    def __init__(self, peer: str, src: LayerBlockGrid, src_slots: np.ndarray, dst: LayerBlockGrid,
                 dst_slots: np.ndarray, start: int, end: int) -> None:
        self.key = ("range", peer, src.mem, dst.mem)
        self._peer, self._src_mem, self._dst_mem = peer, src.mem, dst.mem
        self._descs = []
        for layer in range(src.layers):
            src_starts, lengths = src.token_segments(src_slots, layer, start, end)
            dst_starts, _ = dst.token_segments(dst_slots, layer, start, end)
            self._descs.append(merged_pair_descs(src_starts, dst_starts, lengths, src.device, dst.device))

    def layer_bytes(self, layer: int) -> int:
        return int(self._descs[layer][0][:, 1].sum())

    def parts(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self._descs[layer]

    def post(self, agent: KVAgent, parts: Sequence[tuple[np.ndarray, np.ndarray]], notif: bytes) -> tuple[Any, bool]:
        src = np.concatenate([p[0] for p in parts])
        dst = np.concatenate([p[1] for p in parts])
        return agent.post_descs(self._peer, src, self._src_mem, dst, self._dst_mem, notif)


def make_plan(peer: str, src: LayerBlockGrid, src_slots: np.ndarray, local: Any, dst: LayerBlockGrid,
              dst_slots: np.ndarray, remote: Any, start: int, end: int) -> Plan:
    """The plan for tokens ``[start, end)`` of a request whose block i is ``src_slots[i]`` -> ``dst_slots[i]``.

    Whole blocks from a block boundary to the end use the prepared lists ``local`` and ``remote``.
    """
    if (dst.layers, dst.block_tokens, dst.bytes_per_token) != (src.layers, src.block_tokens, src.bytes_per_token):
        raise ValueError(f"grid {dst.name!r} of {peer!r} has a different block layout than {src.name!r}")
    if dst_slots.size != src_slots.size:
        raise ValueError(f"{peer!r} expects {dst_slots.size} blocks, sender has {src_slots.size}")
    if not 0 <= start < end <= src_slots.size * src.block_tokens:
        raise ValueError(f"token range [{start}, {end}) does not fit {src_slots.size} blocks")
    first = start // src.block_tokens
    if start % src.block_tokens == 0 and end == src_slots.size * src.block_tokens:
        return IndexedPlan(local, remote, src, src_slots[first:], dst, dst_slots[first:])
    return RangePlan(peer, src, src_slots, dst, dst_slots, start, end)
