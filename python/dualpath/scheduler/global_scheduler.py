"""The global scheduler: one FIFO of requests, pull-based fetches by PE and DE group leaders.

Flow per request: `submit` -> global PE FIFO -> a PE group's `fetch_prefill` places it on a PE -> global DE
queue -> a DE group's `fetch_decode` drains that queue into per-group private queues (fewest group tokens
first), places the request on a DE with HBM room and picks the read side. The router calls this per request;
the simulator calls the very same object.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

from dualpath.scheduler.config import SchedulerConfig
from dualpath.scheduler.messages import Assignment, EngineGroup, EngineLoad, NodeLoad, PrefillPick, ReadSide, Request
from dualpath.scheduler.placement import EngineSlot, decode_threshold, pick_decode, pick_prefill, tiebreak
from dualpath.scheduler.read_policies import READ_POLICIES, ReadContext


class GlobalScheduler:
    """Inter-engine scheduling state. Not thread-safe: the caller serialises `submit` and fetches."""

    def __init__(self, groups: Sequence[EngineGroup], config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self._groups: dict[int, EngineGroup] = {}
        for group in groups:
            if group.group_id in self._groups:
                raise ValueError(f"duplicate engine group id {group.group_id}")
            self._groups[group.group_id] = group
        # Seeded ranks and member sets are fixed per group: computed once, not per fetch.
        self._group_rank = {g.group_id: tiebreak(self.config.seed, g.group_id) for g in groups}
        self._members = {g.group_id: frozenset(g.engine_ids) for g in groups}
        self._decode_groups = sorted((g.group_id for g in groups if g.role == "decode"), key=self._group_rank.get)
        self._prefill_queue: deque[Request] = deque()
        self._decode_queue: deque[PrefillPick] = deque()
        self._private: dict[int, deque[PrefillPick]] = {gid: deque() for gid in self._decode_groups}
        # Sum of tok_e last reported by each DE group, plus the tokens waiting in its private queue.
        self._group_tokens: dict[int, int] = dict.fromkeys(self._decode_groups, 0)
        self._private_tokens: dict[int, int] = dict.fromkeys(self._decode_groups, 0)
        # (tokens, rank, group) with lazy deletion: an entry is live while its tokens match the group's.
        self._group_heap = [(0, self._group_rank[gid], gid) for gid in self._decode_groups]
        heapq.heapify(self._group_heap)
        self._ranks = {e: tiebreak(self.config.seed, e) for g in groups for e in g.engine_ids}
        # Per node: its read queue (the last reported read_q plus the tokens assignments charged to it since)
        # and its last reported drain rate. A node that has not reported counts as NodeLoad(node, 0).
        self._read_q: dict[int, int] = {}
        self._drain_rate: dict[int, float] = {}
        self._engine_node: dict[int, int] = {}
        self._rr_engine: dict[int, int] = {}
        self._read_policy = READ_POLICIES[self.config.read_policy]
        self._reads = 0  # assignments with hits so far

    def set_members(self, group_id: int, engine_ids: Sequence[int]) -> None:
        """Engines join or leave a group (ids are never reused); placements already made stand."""
        group = self._groups.get(group_id)
        if group is None:
            raise ValueError(f"unknown engine group {group_id}")
        self._groups[group_id] = EngineGroup(group_id, group.role, tuple(engine_ids))
        self._members[group_id] = frozenset(engine_ids)
        for engine_id in engine_ids:
            self._ranks.setdefault(engine_id, tiebreak(self.config.seed, engine_id))

    # -- requests ---------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request at the tail of the global FIFO."""
        self._prefill_queue.append(request)

    @property
    def waiting_prefill(self) -> int:
        return len(self._prefill_queue)

    @property
    def waiting_decode(self) -> int:
        return len(self._decode_queue) + sum(len(q) for q in self._private.values())

    @property
    def unrouted_decode(self) -> int:
        """Requests on a PE that no DE group has taken into its private queue yet."""
        return len(self._decode_queue)

    def decode_group_tokens(self) -> dict[int, int]:
        """Per DE group: tokens last reported by its engines plus those waiting in its private queue."""
        return dict(self._group_tokens)

    def private_backlog(self, group_id: int) -> int:
        """Requests waiting in a DE group's private queue (a leader with none and no unrouted work can skip
        its fetch)."""
        return len(self._private[group_id])

    # -- fetches ----------------------------------------------------------------------------------------

    def fetch_prefill(self, group_id: int, loads: Sequence[EngineLoad], nodes: Sequence[NodeLoad]) -> list[PrefillPick]:
        """A PE group's leader fetches: place head-of-queue requests until no PE of the group may take one."""
        slots = self._slots(group_id, "prefill", loads, nodes)
        cfg = self.config
        picks: list[PrefillPick] = []
        while self._prefill_queue:
            if cfg.placement == "dualpath":  # read queues change only in DE fetches: no copy needed here
                slot = pick_prefill(slots, self._read_q, cfg.alpha_tokens, cfg.beta_tokens)
            else:
                slot = self._next_round_robin(group_id, [s for s in slots if s.tok <= cfg.beta_tokens])
            if slot is None:
                break
            request = self._prefill_queue.popleft()
            slot.take(request, hbm=False)
            pick = PrefillPick(request, slot.engine_id, slot.tok)
            picks.append(pick)
            self._decode_queue.append(pick)
        return picks

    def fetch_decode(self, group_id: int, loads: Sequence[EngineLoad], nodes: Sequence[NodeLoad]) -> list[Assignment]:
        """A DE group's leader fetches: drain the global DE queue into private queues, then place from ours."""
        slots = self._slots(group_id, "decode", loads, nodes)
        self._set_group_tokens(group_id, sum(s.tok for s in slots) + self._private_tokens[group_id])
        while self._decode_queue:
            pick = self._decode_queue.popleft()
            target = self._least_loaded_group()
            self._private[target].append(pick)
            self._private_tokens[target] += pick.request.total_tokens
            self._set_group_tokens(target, self._group_tokens[target] + pick.request.total_tokens)
        private = self._private[group_id]
        z = decode_threshold((p.request for p in private), slots, self.config.z_factor)
        assignments: list[Assignment] = []
        while private:
            pick = private[0]
            if self.config.placement == "dualpath":
                slot = pick_decode(slots, pick.request, z)
            else:
                slot = self._next_round_robin(
                    group_id, [s for s in slots if s.free_hbm_tokens >= pick.request.hbm_tokens])
            if slot is None:
                break
            private.popleft()
            self._private_tokens[group_id] -= pick.request.total_tokens
            slot.take(pick.request, hbm=True)
            assignments.append(self._with_read_side(pick, slot, group_id))
        return assignments

    # -- helpers ----------------------------------------------------------------------------------------

    def _slots(
        self, group_id: int, role: str, loads: Sequence[EngineLoad], nodes: Sequence[NodeLoad]
    ) -> list[EngineSlot]:
        group = self._groups.get(group_id)
        if group is None:
            raise ValueError(f"unknown engine group {group_id}")
        if group.role != role:
            raise ValueError(f"group {group_id} is a {group.role} group, not {role}")
        members = self._members[group_id]
        if len(loads) != len(members) or not all(load.engine_id in members for load in loads):
            raise ValueError(f"group {group_id} must report each of its engines {sorted(members)} once; "
                             f"got {[load.engine_id for load in loads]}")
        for node in nodes:
            self._drain_rate[node.node_id] = node.drain_tokens_per_s
            self._read_q[node.node_id] = node.read_q
        for load in loads:
            self._engine_node[load.engine_id] = load.node_id
        return [EngineSlot.of(load, self._ranks[load.engine_id]) for load in loads]

    def _set_group_tokens(self, group_id: int, tokens: int) -> None:
        if self._group_tokens[group_id] == tokens:
            return
        self._group_tokens[group_id] = tokens
        heapq.heappush(self._group_heap, (tokens, self._group_rank[group_id], group_id))
        if len(self._group_heap) > 4 * len(self._decode_groups) + 64:  # drop stale entries now and then
            self._group_heap = [(t, self._group_rank[g], g) for g, t in self._group_tokens.items()]
            heapq.heapify(self._group_heap)

    def _least_loaded_group(self) -> int:
        """The DE group with the fewest tokens (ties by seeded rank), in O(log groups)."""
        heap = self._group_heap
        while heap[0][0] != self._group_tokens[heap[0][2]]:
            heapq.heappop(heap)
        return heap[0][2]

    def _next_round_robin(self, group_id: int, eligible: list[EngineSlot]) -> EngineSlot | None:
        if not eligible:
            return None
        members = self._groups[group_id].engine_ids
        start = self._rr_engine.get(group_id, 0)
        allowed = {s.engine_id: s for s in eligible}
        for step in range(len(members)):
            engine_id = members[(start + step) % len(members)]
            if engine_id in allowed:
                self._rr_engine[group_id] = (start + step + 1) % len(members)
                return allowed[engine_id]
        return None

    def _with_read_side(self, pick: PrefillPick, de: EngineSlot, group_id: int) -> Assignment:
        """Ask the read policy where the hit tokens are read; charge them to those nodes' queues until their
        next reports."""
        request = pick.request
        if request.cached_tokens == 0:
            return Assignment(request, pick.pe, de.engine_id, ReadSide.NONE, 0, 0)
        pe_node, de_node, read_q = self._engine_node[pick.pe], de.node_id, self._read_q
        pe_tokens, de_tokens, helper, helper_tokens = self._read_policy(ReadContext(
            self.config, request.cached_tokens, pe_node, de_node, self._groups[group_id].engine_ids, self._reads,
            self._engine_node, read_q, self._drain_rate, pick.pe_tokens))
        self._reads += 1
        side = (ReadSide.SPLIT if helper >= 0 or (pe_tokens and de_tokens)
                else ReadSide.PE if de_tokens == 0 else ReadSide.DE)
        # PE and DE may share a node (in tests): charge one side, then read the other's queue afresh.
        read_q[pe_node] = read_q.get(pe_node, 0) + pe_tokens
        read_q[de_node] = read_q.get(de_node, 0) + de_tokens
        if helper >= 0:
            helper_node = self._engine_node[helper]
            read_q[helper_node] = read_q.get(helper_node, 0) + helper_tokens
        return Assignment(request, pick.pe, de.engine_id, side, pe_tokens, de_tokens, helper, helper_tokens)
