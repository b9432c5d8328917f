"""The paper's per-request rules as pure functions over engine loads (paper section 6.1).

Callers pass mutable per-fetch views (`EngineSlot`) so that each pick sees the tokens the previous picks added.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dualpath.scheduler.messages import EngineLoad, ReadSide, Request

_MASK = (1 << 64) - 1
ALPHA_SECONDS, BETA_SECONDS = 3.0, 5.0  # alpha: a node's reads in 3 s; beta: a PE's prefill in 5 s (paper A.4)


def tiebreak(seed: int, engine_id: int) -> int:
    """A seeded, fixed pseudo-random rank per engine (splitmix64), so equal candidates resolve reproducibly."""
    z = (seed * 0x9E3779B97F4A7C15 + engine_id + 1) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@dataclass(slots=True)
class EngineSlot:
    """One engine's load during a fetch, updated as requests are placed on it."""

    engine_id: int
    node_id: int
    seq: int
    tok: int
    free_hbm_tokens: int
    rank: int

    @staticmethod
    def of(load: EngineLoad, rank: int) -> EngineSlot:
        return EngineSlot(load.engine_id, load.node_id, load.seq, load.tok, load.free_hbm_tokens, rank)

    def take(self, request: Request, hbm: bool) -> None:
        self.seq += 1
        self.tok += request.total_tokens
        if hbm:
            self.free_hbm_tokens -= request.hbm_tokens


def pick_prefill(slots: Sequence[EngineSlot], read_q: dict[int, int], alpha: int, beta: int) -> EngineSlot | None:
    """PE choice: skip tok_e > beta; prefer nodes with read_q <= alpha (C2) over the rest (C3); lowest tok_e."""
    best: EngineSlot | None = None
    best_key: tuple[int, int, int] | None = None
    for slot in slots:
        if slot.tok > beta:
            continue
        key = (0 if read_q.get(slot.node_id, 0) <= alpha else 1, slot.tok, slot.rank)
        if best_key is None or key < best_key:
            best, best_key = slot, key
    return best


def decode_threshold(queue: Iterable[Request], slots: Sequence[EngineSlot], z_factor: float) -> float:
    """Z = z_factor x (tokens of the queued requests that fit in the group's free HBM + sum tok_e) / |E|.

    The fit walks the queue from its head and stops at the first request that no longer fits, ignoring
    fragmentation: an upper bound of what this fetch could place.
    """
    free = sum(max(slot.free_hbm_tokens, 0) for slot in slots)
    fitting = 0
    for request in queue:
        if request.hbm_tokens > free:
            break
        free -= request.hbm_tokens
        fitting += request.total_tokens
    return z_factor * (fitting + sum(slot.tok for slot in slots)) / len(slots)


def pick_decode(slots: Sequence[EngineSlot], request: Request, z: float) -> EngineSlot | None:
    """DE choice inside a group: only DEs with room; normal ones (tok + len <= Z) by fewest requests,
    else the high-token ones by fewest tokens; None when no DE has room."""
    normal: EngineSlot | None = None
    high: EngineSlot | None = None
    for slot in slots:
        if slot.free_hbm_tokens < request.hbm_tokens:
            continue
        if slot.tok + request.total_tokens <= z:
            if normal is None or (slot.seq, slot.rank) < (normal.seq, normal.rank):
                normal = slot
        elif high is None or (slot.tok, slot.rank) < (high.tok, high.rank):
            high = slot
    return normal if normal is not None else high


def split_tokens(hit: int, queues: Sequence[int], rates: Sequence[float], block: int) -> list[int]:
    """Hit tokens per reader so that all read queues finish together (water-filling: readers whose queue
    outlasts the others read nothing). The readers after the first read consecutive ranges of the hit, the
    first reads the rest; the ranges' ends fall on whole blocks or on the end of the hit, whichever is nearer
    (the request's last, partial block counts as a block).
    """
    finish = sorted(range(len(queues)), key=lambda i: queues[i] / rates[i])
    level, queued, rate = 0.0, 0.0, 0.0
    for rank, i in enumerate(finish):
        queued, rate = queued + queues[i], rate + rates[i]
        level = (hit + queued) / rate
        if rank + 1 == len(finish) or level <= queues[finish[rank + 1]] / rates[finish[rank + 1]]:
            break
    tokens = [0] * len(queues)
    end, exact_end = 0, 0.0
    for i in range(1, len(queues)):
        exact_end = min(exact_end + max(0.0, level * rates[i] - queues[i]), float(hit))
        lower = int(exact_end) // block * block
        upper = min(lower + block, hit)
        tokens[i] = (lower if exact_end - lower <= upper - exact_end else upper) - end
        end += tokens[i]
    tokens[0] = hit - end
    return tokens


def read_side(pe_q: int, de_q: int) -> ReadSide:
    """All hit KV goes to the side whose node has the shorter read queue; ties go to the PE (no DE->PE hop)."""
    return ReadSide.PE if pe_q <= de_q else ReadSide.DE
