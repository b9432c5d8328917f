"""The router's side of the global scheduler: one decision (PE, DE, read side) per request.

All prefill servers form one PE group and all decode servers one DE group, so that every fetch applies the
paper's rules across every server (the lowest ``tok_e`` among PEs on short-queue nodes; the Z rule and HBM
admission among DEs); with a group per server, the order of the fetches would pick the PE instead.
A request that cannot be placed now waits in the scheduler's FIFO; ``pump`` runs again whenever the loads
change (a poll, a dispatch completing), so waiting costs nothing and resumes at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any, NamedTuple

from dualpath.router.config import RouterConfig
from dualpath.router.engines import Engine, EngineRegistry
from dualpath.router.protocol import CHARS_PER_TOKEN, ParsedRequest
from dualpath.router.store_view import NOTHING_STORED, StoreView
from dualpath.router.tokens import Probe
from dualpath.scheduler import (
    MODES,
    Assignment,
    EngineGroup,
    EngineLoad,
    GlobalScheduler,
    NodeLoad,
    ReadSide,
    Request,
    RouteHint,
    SchedulerConfig,
)
from dualpath.scheduler.route_hint import Reader

log = logging.getLogger(__name__)
PREFILL_GROUP, DECODE_GROUP = 0, 1
UNREPORTED_HBM = 1 << 62  # a DE that does not report its KV capacity is never refused for lack of room
DECISION_LOG = 1024
SPLIT_BLOCK_TOKENS = 64  # split points fall on whole Full Blocks of this size unless --store-block-tokens says


class Placement(NamedTuple):
    """The decision for one request, and the hint both servers get."""

    request: Request
    pe: Engine
    de: Engine
    planned: ReadSide  # the scheduler's side
    hint: RouteHint  # what is sent: the DE side only where both servers have a DualPath KV channel
    helper: Engine | None = None  # a split read's helper DE, when it is up and has a KV channel

    def reader_engine(self, reader: Reader) -> Engine:
        """The engine whose node reads for ``reader`` of the hint's plan (None: the prefill's own NIC)."""
        if reader is None:
            return self.pe
        return self.helper if self.helper is not None and reader == self.helper.kv_channel else self.de


class PlacedReads:
    """Hit tokens this router sent to each node's storage NIC, drained at the configured read rate.

    A node's reported read queue lags the placements: a PE queues a read only once the request reached it,
    a DE only once its PE asked for the pages. A report that does not show a burst's reads yet would undo
    the scheduler's charges for them and send the rest of the burst to that side; a node's queue is
    therefore taken as at least what this router placed there and the node cannot have read yet.
    """

    def __init__(self, tokens_per_s: float) -> None:
        self.tokens_per_s = tokens_per_s
        self._placed: dict[int, tuple[float, float]] = {}  # node id -> (tokens left, as of when)

    def pending(self, node_id: int, now: float) -> int:
        tokens, at = self._placed.get(node_id, (0.0, now))
        return int(max(0.0, tokens - self.tokens_per_s * (now - at)))

    def add(self, node_id: int, tokens: int, now: float) -> None:
        if tokens > 0:
            self._placed[node_id] = (self.pending(node_id, now) + tokens, now)


class Decider:
    """Owns the GlobalScheduler; every call runs on the event loop, which serialises them."""

    def __init__(self, config: RouterConfig, registry: EngineRegistry, store: StoreView | None) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        groups = [EngineGroup(PREFILL_GROUP, "prefill", tuple(e.engine_id for e in registry.prefill)),
                  EngineGroup(DECODE_GROUP, "decode", tuple(e.engine_id for e in registry.decode))]
        self.scheduler = GlobalScheduler(groups, MODES[config.mode].scheduler_config(SchedulerConfig.profiled(
            config.read_tokens_per_s, config.gpu_tokens_per_s,
            split_block_tokens=config.store_block_tokens or SPLIT_BLOCK_TOKENS)))
        self._beta = self.scheduler.config.beta_tokens
        self._ids = itertools.count()
        self._waiters: dict[int, asyncio.Future[Placement]] = {}
        self._node_reports_seen = -1
        self._tp_mismatches: set[tuple[str, str]] = set()
        self._placed_reads = PlacedReads(config.read_tokens_per_s)
        self._engines = {e.engine_id: e for e in registry.engines}
        self._reports: dict[int, tuple[int, EngineLoad]] = {}  # engine id -> (its version, its report)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=DECISION_LOG)

    def members_changed(self) -> None:
        """Engines joined or left the registry: the scheduler's groups follow, then place what waits."""
        self.scheduler.set_members(PREFILL_GROUP, [e.engine_id for e in self.registry.prefill])
        self.scheduler.set_members(DECODE_GROUP, [e.engine_id for e in self.registry.decode])
        self._engines.update((e.engine_id, e) for e in self.registry.engines)
        self.pump()

    @property
    def waiting(self) -> int:
        """Requests the scheduler holds, waiting for a PE or a DE."""
        return self.scheduler.waiting_prefill + self.scheduler.waiting_decode

    def estimate(self, parsed: ParsedRequest) -> tuple[int, int]:
        """(hit tokens, new tokens) of a request; text the router did not tokenize counts as new."""
        store, block_tokens, namespace = self.store, self.registry.page_size, self.registry.store_namespace
        cached = new = 0
        for index, ids in enumerate(parsed.token_ids):
            if parsed.hit_tokens:
                hit = parsed.hit_tokens[index]
            elif store is not None and block_tokens and namespace:
                hit = store.hit_tokens(ids, namespace, block_tokens)
            else:
                hit = 0
            hit = min(hit, len(ids) - 1)  # the last prompt token is always computed
            cached, new = cached + hit, new + len(ids) - hit
        new += -(-parsed.text_chars // CHARS_PER_TOKEN)
        return cached, max(new, 1)

    def probe(self) -> Probe:
        """A probe of the store for one prompt that the router's tokenizer encodes (``PromptTokenizer.with_ids``)."""
        store, block_tokens, namespace = self.store, self.registry.page_size, self.registry.store_namespace
        if store is None or not block_tokens or not namespace:
            return NOTHING_STORED
        return store.probe(namespace, block_tokens)

    async def place(self, parsed: ParsedRequest) -> Placement:
        """Queue the request and wait (at most ``queue_timeout_s``, then TimeoutError) for its placement."""
        cached, new = self.estimate(parsed)
        request = Request(next(self._ids), cached, new, parsed.gen_tokens * parsed.items)
        future: asyncio.Future[Placement] = asyncio.get_running_loop().create_future()
        self._waiters[request.request_id] = future
        self.scheduler.submit(request)
        self.pump()
        # A request given up on stays in the scheduler's FIFO; pump() releases it the moment it is placed.
        return await asyncio.wait_for(future, self.config.queue_timeout_s)

    def release_prefill(self, placement: Placement) -> None:
        placement.pe.charge(-1, -placement.request.total_tokens, 0)
        self.pump()

    def release_decode(self, placement: Placement) -> None:
        request = placement.request
        placement.de.charge(-1, -request.total_tokens, -request.hbm_tokens)
        self.pump()

    def pump(self) -> None:
        """Place whatever the current loads allow; wakes the waiting requests that got a placement."""
        if not self._waiters:
            return
        nodes = self._node_reports()
        engines = self._engines
        picks = self.scheduler.fetch_prefill(PREFILL_GROUP, [self._load(e) for e in self.registry.prefill], nodes)
        for pick in picks:
            engines[pick.pe].charge(1, pick.request.total_tokens, 0)
        if not self.scheduler.waiting_decode:
            return
        for assignment in self.scheduler.fetch_decode(
                DECODE_GROUP, [self._load(e) for e in self.registry.decode], nodes):
            placement = self._placement(assignment, engines)
            now = time.monotonic()
            for reader, tokens in placement.hint.plan.tokens(assignment.request.cached_tokens):
                self._placed_reads.add(placement.reader_engine(reader).node_id, tokens, now)
            placement.de.charge(1, assignment.request.total_tokens, assignment.request.hbm_tokens)
            future = self._waiters.pop(assignment.request.request_id)
            if future.done():  # its client gave up while it waited
                placement.pe.charge(-1, -assignment.request.total_tokens, 0)
                placement.de.charge(-1, -assignment.request.total_tokens, -assignment.request.hbm_tokens)
                continue
            self._log(placement)
            future.set_result(placement)

    def _node_reports(self) -> list[NodeLoad]:
        """Node read queues, only when a poll brought new ones: in between, the scheduler's own charges
        for the reads it just placed stand (so that a burst spreads over both sides). A report never
        counts less than this router's placed reads the node cannot have finished (``PlacedReads``)."""
        if self.registry.polls == self._node_reports_seen:
            return []
        self._node_reports_seen = self.registry.polls
        rate, now = self.config.read_tokens_per_s, time.monotonic()
        reports = {node: self.registry.node_report(node) for node in self.registry.node_ids}
        return [NodeLoad(node_id, max(reports[node].pending_tokens if reports[node] else 0,
                                      self._placed_reads.pending(node_id, now)), rate)
                for node, node_id in self.registry.node_ids.items()]

    def _load(self, engine: Engine) -> EngineLoad:
        """What an engine reports to the scheduler; one that is down or whose breaker is open reports itself full."""
        cached = self._reports.get(engine.engine_id)
        if cached is not None and cached[0] == engine.version:
            return cached[1]
        if engine.role == "prefill":
            tokens = engine.tokens if engine.routable else self._beta + 1 + engine.tokens
            load = EngineLoad(engine.engine_id, engine.node_id, engine.seq, tokens)
        else:
            free = engine.free_hbm_tokens
            free = UNREPORTED_HBM if free is None else free
            load = EngineLoad(engine.engine_id, engine.node_id, engine.seq, engine.tokens,
                              free if engine.routable else 0)
        self._reports[engine.engine_id] = (engine.version, load)
        return load

    def _placement(self, assignment: Assignment, engines: dict[int, Engine]) -> Placement:
        """The hint for ``assignment``; reads meant for a DE that cannot serve them go to the PE instead."""
        pe, de = engines[assignment.pe], engines[assignment.de]
        helper = engines.get(assignment.helper)
        if helper is not None and not (helper.routable and helper.kv_channel and self._ranks_match(pe, helper)):
            helper = None
        hint = RouteHint(ReadSide.PE)
        if (assignment.side in (ReadSide.DE, ReadSide.SPLIT) and pe.kv_channel and de.kv_channel
                and self._ranks_match(pe, de)):
            if assignment.side is ReadSide.DE:
                hint = RouteHint(ReadSide.DE, pe.kv_channel, de.kv_channel)
            elif helper is not None:
                hint = RouteHint(ReadSide.SPLIT, pe.kv_channel, de.kv_channel, assignment.de_read_tokens,
                                 helper.kv_channel, assignment.helper_read_tokens)
            elif assignment.de_read_tokens:
                hint = RouteHint(ReadSide.SPLIT, pe.kv_channel, de.kv_channel, assignment.de_read_tokens)
        return Placement(assignment.request, pe, de, assignment.side, hint, helper if hint.helper_tokens else None)

    def _ranks_match(self, pe: Engine, de: Engine) -> bool:
        """A DE reads for a PE rank by rank: both need the same tensor-parallel size (logged once per pair)."""
        if pe.tp_size == de.tp_size:
            return True
        if (pe.url, de.url) not in self._tp_mismatches:
            self._tp_mismatches.add((pe.url, de.url))
            log.error("%s runs tp=%d and %s tp=%d: the DE cannot read for the PE rank by rank; their requests read "
                      "on the PE side", pe.url, pe.tp_size, de.url, de.tp_size)
        return False

    def _log(self, placement: Placement) -> None:
        request = placement.request
        self.decisions.append({
            "request_id": request.request_id, "time": time.time(), "prefill": placement.pe.url,
            "decode": placement.de.url, "side": placement.hint.side.value, "planned_side": placement.planned.value,
            "cached_tokens": request.cached_tokens, "new_tokens": request.new_tokens,
            "gen_tokens": request.gen_tokens, "routing_key": placement.hint.encode(),
        })
