"""The simulated PD cluster: storage NICs, prefill engines, decode engines and the production scheduler.

simpy supplies the clock and event queue; state changes run as event callbacks (no process per request) so
that a 1,152-GPU run with millions of requests fits in minutes. A timeout carries its callback's data as its
value (a tuple) rather than in a closure: millions of events each save building a function and its cells.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from dualpath.scheduler import (
    Assignment,
    BatcherConfig,
    Chunk,
    ComputeQuotaBatcher,
    EngineGroup,
    GlobalScheduler,
    Mode,
    NodeLoad,
    Request,
    SchedulerConfig,
)
from dualpath.sim.engines import DecodeEngine, Job, PrefillEngine, StorageNic
from dualpath.sim.hardware import HardwareSpec, ModelSpec, PrefillCost


@dataclass(frozen=True)
class ClusterSpec:
    prefill_nodes: int
    decode_nodes: int
    model: ModelSpec
    mode: Mode
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    fetch_interval_s: float = 0.2
    quota_s: float = 0.3
    seed: int = 0
    # The scheduler's thresholds as a router was configured (a simulated copy of a real cluster); None: the
    # paper's, profiled from this spec's hardware and model.
    scheduler: SchedulerConfig | None = None
    # The router's grouping: every PE in one group and every DE in another, each fetch seeing every node's read
    # queue (``dualpath.router.decide``); else the paper's, a group per node that sees its own node.
    role_groups: bool = False

    def __post_init__(self) -> None:
        if self.prefill_nodes < 1 or self.decode_nodes < 1:
            raise ValueError(f"need >= 1 prefill and decode node, got {self.prefill_nodes}P{self.decode_nodes}D")


class Cluster:
    """Builds engines, groups and the scheduler for one spec; `submit` injects a request."""

    STAT_WINDOW_S = 10.0

    def __init__(self, spec: ClusterSpec, env: simpy.Environment | None = None) -> None:
        self.spec, self.env = spec, env or simpy.Environment()
        hw, model = spec.hardware, spec.model
        gpus = hw.gpus_per_node
        nodes = spec.prefill_nodes + spec.decode_nodes
        self.bpt = model.bytes_per_token
        self.nics = [StorageNic(hw.node_read_bps(nodes)) for _ in range(nodes)]
        self.pes = [PrefillEngine(i, i // gpus) for i in range(spec.prefill_nodes * gpus)]
        first_de = len(self.pes)
        self.des = [DecodeEngine(first_de + i, spec.prefill_nodes + i // gpus, model.de_hbm_tokens,
                                 model.decode_step_seconds) for i in range(spec.decode_nodes * gpus)]
        self._de_by_id = {de.engine_id: de for de in self.des}
        if spec.role_groups:
            groups = [EngineGroup(0, "prefill", tuple(pe.engine_id for pe in self.pes)),
                      EngineGroup(1, "decode", tuple(de.engine_id for de in self.des))]
            self._group_of_node = [0] * spec.prefill_nodes + [1] * spec.decode_nodes
            self._group_nodes = [list(range(nodes))] * 2
        else:  # a group id is its node id
            groups = [EngineGroup(n, "prefill", tuple(range(n * gpus, (n + 1) * gpus)))
                      for n in range(spec.prefill_nodes)]
            groups += [EngineGroup(spec.prefill_nodes + n, "decode", tuple(range(first_de + n * gpus,
                                                                                 first_de + (n + 1) * gpus)))
                       for n in range(spec.decode_nodes)]
            self._group_of_node = list(range(nodes))
            self._group_nodes = [[node] for node in range(nodes)]
        self.groups = groups
        self._group_engines = {g.group_id: [self.pes[e] for e in g.engine_ids] if g.role == "prefill"
                               else [self._de_by_id[e] for e in g.engine_ids] for g in groups}
        thresholds = spec.scheduler or SchedulerConfig.profiled(
            hw.node_read_bps(nodes) / self.bpt, self._prompt_tokens_per_gpu_second(),
            prefill_tokens_per_s=self._prompt_tokens_per_gpu_second(capped_by_reads=False), seed=spec.seed)
        self.scheduler = GlobalScheduler(groups, spec.mode.scheduler_config(thresholds))
        # The batcher's quota bounds the attention part of the forward (paper 6.2), summed over layers.
        cap = None if spec.mode.layerwise else model.basic_pe_hbm_tokens
        self.batcher = ComputeQuotaBatcher(PrefillCost(model, hw.peak_flops, attention_only=True),
                                           BatcherConfig(spec.quota_s, cap))
        self._forward_cost = PrefillCost(model, hw.peak_flops)
        self._kv_cnic_bps = hw.kv_cnic_bps
        self.jobs: dict[int, Job] = {}
        # Groups whose engines freed tokens or HBM since their last fetch (all of them at the start).
        self._may_fetch = {g.group_id for g in groups}
        self._backlog_seen = dict.fromkeys((g.group_id for g in groups if g.role == "decode"), 0)
        self._pass_scheduled = False
        self._passes = 0
        # Seconds per placed request of each timed fetch (arrays of doubles: no float object per sample).
        self.prefill_decision_s = array("d")
        self.decode_decision_s = array("d")
        self.timer: Callable[[], float] | None = None

    # -- public --------------------------------------------------------------------------------------------

    def submit(self, request: Request, on_done: Callable[[Job], None]) -> Job:
        job = Job(request, self.env.now, on_done)
        self.jobs[request.request_id] = job
        self.scheduler.submit(request)
        self._kick()
        return job

    def snic_max_over_avg(self, start: float, end: float) -> float:
        """Bytes read per storage NIC between `start` and `end` (10 s resolution): max over the mean, 1.0
        when nothing was read. Short windows only measure burstiness, so callers pass a loaded stretch."""
        first = int(start // self.STAT_WINDOW_S)
        last = max(int(end // self.STAT_WINDOW_S), first + 1)
        loads = [sum(nic.bytes_read.get(w, 0.0) for w in range(first, last)) for nic in self.nics]
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    # -- models --------------------------------------------------------------------------------------------

    def _prompt_tokens_per_gpu_second(self, capped_by_reads: bool = True) -> float:
        """beta's rate, as a profile of this cluster would measure it: prompt tokens (hit + new) one PE clears
        per second at a typical agent turn (32K hit, 429 new), limited by compute or (``capped_by_reads``) by its
        share of the storage NICs that may read for it."""
        spec = self.spec
        per_request = spec.model.prefill_seconds([(32_000, 429)], spec.hardware.peak_flops)
        rate = 32_429 / per_request
        if spec.mode.io and capped_by_reads:
            readers = spec.prefill_nodes if spec.mode.read_policy == "pe_only" else len(self.nics)
            read_share = self.nics[0].rate / self.bpt * readers / len(self.pes)
            rate = min(rate, read_share * 32_429 / 32_000)
        return rate

    # -- scheduling pass -----------------------------------------------------------------------------------

    def _kick(self) -> None:
        if not self._pass_scheduled:
            self._pass_scheduled = True
            self.env.timeout(self.spec.fetch_interval_s).callbacks.append(self._scheduling_pass)

    def _node_load(self, node_id: int) -> NodeLoad:
        nic = self.nics[node_id]
        return NodeLoad(node_id, nic.pending, nic.rate / self.bpt)

    def _scheduling_pass(self, _event: object) -> None:
        """Every group leader fetches, except those whose fetch would certainly return nothing: a PE group
        that was saturated at its last fetch and has freed nothing since, a DE group with no new work and
        no HBM freed since its last fetch. Skipping those keeps 1,000-GPU runs cheap without changing a
        decision."""
        self._pass_scheduled = False
        sched, timer, may_fetch = self.scheduler, self.timer, self._may_fetch
        # Leaders fetch at staggered times in a real cluster; rotating who goes first in each pass keeps one
        # group from always seeing the queue first.
        self._passes += 1
        first = self._passes % len(self.groups)
        for group in self.groups[first:] + self.groups[:first]:
            gid = group.group_id
            if group.role == "prefill":
                if not sched.waiting_prefill or gid not in may_fetch:
                    continue
                loads = [pe.report() for pe in self._group_engines[gid]]
                start = timer() if timer else 0.0
                picks = sched.fetch_prefill(gid, loads, [self._node_load(n) for n in self._group_nodes[gid]])
                if timer and picks:
                    self.prefill_decision_s.append((timer() - start) / len(picks))
                if sched.waiting_prefill:  # the fetch stopped because the whole group is above beta
                    may_fetch.discard(gid)
                for pick in picks:
                    self.pes[pick.pe].place(pick.request)
                    self.jobs[pick.request.request_id].pe = pick.pe
            else:
                backlog = sched.private_backlog(gid)
                if not sched.unrouted_decode and (not backlog or (
                        gid not in may_fetch and backlog <= self._backlog_seen[gid])):
                    continue
                loads = [de.report() for de in self._group_engines[gid]]
                start = timer() if timer else 0.0
                assignments = sched.fetch_decode(gid, loads, [self._node_load(n) for n in self._group_nodes[gid]])
                if timer and assignments:
                    self.decode_decision_s.append((timer() - start) / len(assignments))
                self._backlog_seen[gid] = sched.private_backlog(gid)
                may_fetch.discard(gid)
                for assignment in assignments:
                    self._start(assignment)
        if sched.waiting_prefill or sched.waiting_decode:
            self._kick()

    def _start(self, assignment: Assignment) -> None:
        request = assignment.request
        job = self.jobs[request.request_id]
        de = self._de_by_id[assignment.de]
        de.place(request)
        job.de = assignment.de
        job.de_read_tokens = assignment.de_read_tokens
        reads = [(self.pes[assignment.pe].node_id, assignment.pe_read_tokens), (de.node_id, assignment.de_read_tokens)]
        if assignment.helper >= 0:  # its reads reach the PE over RDMA and go on to the DE with the PE's own
            reads.append((self._de_by_id[assignment.helper].node_id, assignment.helper_read_tokens))
        reads = [(node, tokens) for node, tokens in reads if tokens > 0] if self.spec.mode.io else []
        job.pending_reads = len(reads)
        if not reads:
            self._ready(job)
            return
        for node, tokens in reads:
            self._read(node, tokens, job)

    def _read(self, node_id: int, tokens: int, job: Job) -> None:
        nic, now = self.nics[node_id], self.env.now
        start = max(now, nic.busy_until)
        nic.busy_until = start + tokens * self.bpt / nic.rate
        nic.pending += tokens
        self.env.timeout(nic.busy_until - now, (nic, tokens, job)).callbacks.append(self._read_done)

    def _read_done(self, event: simpy.Timeout) -> None:
        nic, tokens, job = event.value
        nic.pending -= tokens
        window = int(self.env.now // self.STAT_WINDOW_S)
        nic.bytes_read[window] = nic.bytes_read.get(window, 0.0) + tokens * self.bpt
        job.pending_reads -= 1
        if job.pending_reads == 0:
            self._ready(job)

    # -- prefill -------------------------------------------------------------------------------------------

    def _ready(self, job: Job) -> None:
        request = job.request
        pe = self.pes[job.pe]
        pe.ready.append(Chunk(request.request_id, request.cached_tokens, request.new_tokens))
        if not pe.busy:
            self._run_batch(pe)

    def _run_batch(self, pe: PrefillEngine) -> None:
        batch = self.batcher.form_batch(pe.ready)
        if not batch:
            pe.busy = False
            return
        pe.busy = True
        for _ in batch:
            pe.ready.popleft()
        last = batch[-1]
        remaining = self.jobs[last.key].request.total_tokens - last.cached - last.new
        if remaining > 0:  # the chunked tail goes back to the head of the queue with its KV now cached
            pe.ready.appendleft(Chunk(last.key, last.cached + last.new, remaining))
        self.env.timeout(self._batch_seconds(batch), (pe, batch)).callbacks.append(self._batch_done)

    def _batch_seconds(self, batch: list[Chunk]) -> float:
        compute = self._forward_cost.batch_seconds((chunk.cached, chunk.new) for chunk in batch)
        if not self.spec.mode.io:
            return compute
        # In: every chunk's cached KV enters HBM (from the PE buffer or, on the DE path, over RDMA).
        # Out: the PE path ships hit + new KV to the DE buffer, the DE path only the new tokens.
        tokens_in = tokens_out = 0
        for chunk in batch:
            tokens_in += chunk.cached
            tokens_out += chunk.new + self._pe_side_hit(chunk)
        transfer_in = tokens_in * self.bpt / self._kv_cnic_bps
        transfer_out = tokens_out * self.bpt / self._kv_cnic_bps
        if self.spec.mode.layerwise:
            # One layer's worth of load and store pipelines around the compute of the others.
            layers = self.spec.model.geometry.layers
            return max(compute, transfer_in, transfer_out) + (transfer_in + transfer_out) / layers
        return transfer_in + compute + transfer_out

    def _pe_side_hit(self, chunk: Chunk) -> int:
        """Hit tokens this chunk must forward to the DE: those read on the PE side, once, with the first chunk."""
        job = self.jobs[chunk.key]
        if chunk.cached != job.request.cached_tokens:
            return 0
        return job.request.cached_tokens - job.de_read_tokens

    def _batch_done(self, event: simpy.Timeout) -> None:
        pe, batch = event.value
        now = self.env.now
        for chunk in batch:
            job = self.jobs[chunk.key]
            request = job.request
            if chunk.cached + chunk.new < request.total_tokens:
                continue
            pe.release(request)
            self._may_fetch.add(self._group_of_node[pe.node_id])
            job.prefill_done = now
            # The DE buffer -> DE HBM copy before decoding starts.
            h2d = request.total_tokens * self.bpt / self._kv_cnic_bps if self.spec.mode.io else 0.0
            self.env.timeout(h2d, job).callbacks.append(self._join_decode)
        self._kick()
        self._run_batch(pe)

    # -- decode --------------------------------------------------------------------------------------------

    def _join_decode(self, event: simpy.Timeout) -> None:
        job = event.value
        de = self._de_by_id[job.de]
        now = self.env.now
        if de.join(job, now):
            self._wake(de)
        job.first_token = now + de.step_s
        job.tpot = now  # start of decode; turned into seconds per token at the finish

    def _wake(self, de: DecodeEngine) -> None:
        delay = de.next_finish_delay()
        if delay is not None:
            self.env.timeout(delay, (de, de.version)).callbacks.append(self._decode_tick)

    def _decode_tick(self, event: simpy.Timeout) -> None:
        de, version = event.value
        if version != de.version:
            return
        now = self.env.now
        finished = de.finish_due(now)
        for job in finished:
            request = job.request
            job.finish = now
            job.first_token = min(job.first_token, now)  # its first step ran faster than the batch at its join
            job.tpot = (now - job.tpot) / max(request.gen_tokens, 1)
            del self.jobs[request.request_id]
            job.on_done(job)
        if finished:
            self._may_fetch.add(self._group_of_node[de.node_id])
            self._kick()
        self._wake(de)
