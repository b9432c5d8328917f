"""The simulated PD cluster: storage NICs, prefill engines, decode engines and the production scheduler.

simpy supplies the clock and event queue; state changes run as event callbacks (no process per request) so
that a 1,152-GPU run with millions of requests fits in minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

from dualpath.scheduler import (
    Assignment,
    BatcherConfig,
    Chunk,
    ComputeQuotaBatcher,
    EngineGroup,
    EngineLoad,
    GlobalScheduler,
    NodeLoad,
    Request,
)
from dualpath.sim.engines import DecodeEngine, Job, PrefillEngine, StorageNic
from dualpath.sim.hardware import HardwareSpec, ModelSpec
from dualpath.sim.modes import Mode


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
        self.des = [DecodeEngine(first_de + i, spec.prefill_nodes + i // gpus) for i in range(spec.decode_nodes * gpus)]
        self._de_by_id = {de.engine_id: de for de in self.des}
        groups = [EngineGroup(n, "prefill", tuple(range(n * gpus, (n + 1) * gpus))) for n in range(spec.prefill_nodes)]
        groups += [EngineGroup(spec.prefill_nodes + n, "decode", tuple(first_de + n * gpus + i for i in range(gpus)))
                   for n in range(spec.decode_nodes)]
        self.groups = groups
        read_tokens_per_s = hw.node_read_bps(nodes) / self.bpt
        gpu_tokens_per_s = self._prompt_tokens_per_gpu_second()
        self.scheduler = GlobalScheduler(groups, spec.mode.scheduler_config(
            int(3 * read_tokens_per_s), int(5 * gpu_tokens_per_s), spec.seed))
        quota_cost = self._predicted_attention
        cap = None if spec.mode.layerwise else model.basic_pe_hbm_tokens
        self.batcher = ComputeQuotaBatcher(quota_cost, BatcherConfig(spec.quota_s, cap))
        self.jobs: dict[int, Job] = {}
        # Groups whose engines freed tokens or HBM since their last fetch (all of them at the start).
        self._may_fetch = {g.group_id for g in groups}
        self._backlog_seen = dict.fromkeys((g.group_id for g in groups if g.role == "decode"), 0)
        self._pass_scheduled = False
        self._passes = 0
        self.prefill_decision_s: list[float] = []
        self.decode_decision_s: list[float] = []
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

    def _prompt_tokens_per_gpu_second(self) -> float:
        """beta's rate, as a profile of this cluster would measure it: prompt tokens (hit + new) one PE clears
        per second at a typical agent turn (32K hit, 429 new), limited by compute or by its share of the
        storage NICs that may read for it."""
        spec = self.spec
        per_request = spec.model.prefill_seconds([(32_000, 429)], spec.hardware.peak_flops)
        rate = 32_429 / per_request
        if spec.mode.io:
            readers = spec.prefill_nodes if spec.mode.read_policy == "pe_only" else len(self.nics)
            read_share = self.nics[0].rate / self.bpt * readers / len(self.pes)
            rate = min(rate, read_share * 32_429 / 32_000)
        return rate

    def _predicted_forward(self, pairs: list[tuple[int, int]]) -> float:
        return self.spec.model.prefill_seconds(pairs, self.spec.hardware.peak_flops)

    def _predicted_attention(self, pairs: list[tuple[int, int]]) -> float:
        """The batcher's quota bounds the attention part of the forward (paper 6.2), summed over layers."""
        return self.spec.model.prefill_seconds(pairs, self.spec.hardware.peak_flops, attention_only=True)

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
        sched, gpus = self.scheduler, self.spec.hardware.gpus_per_node
        timer = self.timer
        # Leaders fetch at staggered times in a real cluster; rotating who goes first in each pass keeps one
        # group from always seeing the queue first.
        self._passes += 1
        first = self._passes % len(self.groups)
        for group in self.groups[first:] + self.groups[:first]:
            gid = group.group_id
            if group.role == "prefill":
                if not sched.waiting_prefill or gid not in self._may_fetch:
                    continue
                loads = [EngineLoad(e, gid, self.pes[e].seq, self.pes[e].tok) for e in group.engine_ids]
                start = timer() if timer else 0.0
                picks = sched.fetch_prefill(gid, loads, [self._node_load(gid)])
                if timer and picks:
                    self.prefill_decision_s.append((timer() - start) / len(picks))
                if sched.waiting_prefill:  # the fetch stopped because the whole group is above beta
                    self._may_fetch.discard(gid)
                for pick in picks:
                    pe = self.pes[pick.pe]
                    pe.seq += 1
                    pe.tok += pick.request.total_tokens
                    self.jobs[pick.request.request_id].pe = pick.pe
            else:
                backlog = sched.private_backlog(gid)
                if not sched.unrouted_decode and (not backlog or (
                        gid not in self._may_fetch and backlog <= self._backlog_seen[gid])):
                    continue
                loads = []
                for e in group.engine_ids:
                    de = self._de_by_id[e]
                    loads.append(EngineLoad(e, gid, de.seq, de.tok, self.spec.model.de_hbm_tokens - de.reserved))
                start = timer() if timer else 0.0
                assignments = sched.fetch_decode(gid, loads, [self._node_load(gid)])
                if timer and assignments:
                    self.decode_decision_s.append((timer() - start) / len(assignments))
                self._backlog_seen[gid] = sched.private_backlog(gid)
                self._may_fetch.discard(gid)
                for assignment in assignments:
                    self._start(assignment, gpus)
        if sched.waiting_prefill or sched.waiting_decode:
            self._kick()

    def _start(self, assignment: Assignment, gpus: int) -> None:
        request = assignment.request
        job = self.jobs[request.request_id]
        de = self._de_by_id[assignment.de]
        de.seq += 1
        de.tok += request.total_tokens
        de.reserved += request.hbm_tokens
        job.de = assignment.de
        job.de_read_tokens = assignment.de_read_tokens
        if not self.spec.mode.io:
            self._ready(job)
            return
        reads = [(self.pes[assignment.pe].node_id, assignment.pe_read_tokens), (de.node_id, assignment.de_read_tokens)]
        job.pending_reads = sum(1 for _, tokens in reads if tokens > 0)
        if job.pending_reads == 0:
            self._ready(job)
        for node_id, tokens in reads:
            if tokens > 0:
                self._read(node_id, tokens, job)

    def _read(self, node_id: int, tokens: int, job: Job) -> None:
        nic, now = self.nics[node_id], self.env.now
        start = max(now, nic.busy_until)
        nic.busy_until = start + tokens * self.bpt / nic.rate
        nic.pending += tokens

        def done(_event: object) -> None:
            nic.pending -= tokens
            window = int(self.env.now // self.STAT_WINDOW_S)
            nic.bytes_read[window] = nic.bytes_read.get(window, 0.0) + tokens * self.bpt
            job.pending_reads -= 1
            if job.pending_reads == 0:
                self._ready(job)

        self.env.timeout(nic.busy_until - now).callbacks.append(done)

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
        job_last = self.jobs[last.key]
        remaining = job_last.request.cached_tokens + job_last.request.new_tokens - last.cached - last.new
        if remaining > 0:  # the chunked tail goes back to the head of the queue with its KV now cached
            pe.ready.appendleft(Chunk(last.key, last.cached + last.new, remaining))
        self.env.timeout(self._batch_seconds(batch)).callbacks.append(lambda _e: self._batch_done(pe, batch))

    def _batch_seconds(self, batch: list[Chunk]) -> float:
        compute = self._predicted_forward([(c.cached, c.new) for c in batch])
        if not self.spec.mode.io:
            return compute
        hw, layers = self.spec.hardware, self.spec.model.geometry.layers
        # In: every chunk's cached KV enters HBM (from the PE buffer or, on the DE path, over RDMA).
        # Out: the PE path ships hit + new KV to the DE buffer, the DE path only the new tokens.
        tokens_in = sum(c.cached for c in batch)
        tokens_out = sum(c.new + self._pe_side_hit(c) for c in batch)
        transfer_in = tokens_in * self.bpt / hw.kv_cnic_bps
        transfer_out = tokens_out * self.bpt / hw.kv_cnic_bps
        if self.spec.mode.layerwise:
            # One layer's worth of load and store pipelines around the compute of the others.
            return max(compute, transfer_in, transfer_out) + (transfer_in + transfer_out) / layers
        return transfer_in + compute + transfer_out

    def _pe_side_hit(self, chunk: Chunk) -> int:
        """Hit tokens this chunk must forward to the DE: those read on the PE side, once, with the first chunk."""
        request = self.jobs[chunk.key].request
        if chunk.cached != request.cached_tokens:
            return 0
        return request.cached_tokens - self.jobs[chunk.key].de_read_tokens

    def _batch_done(self, pe: PrefillEngine, batch: list[Chunk]) -> None:
        now = self.env.now
        for chunk in batch:
            job = self.jobs[chunk.key]
            if chunk.cached + chunk.new < job.request.total_tokens:
                continue
            pe.seq -= 1
            pe.tok -= job.request.total_tokens
            self._may_fetch.add(pe.node_id)
            job.prefill_done = now
            # The DE buffer -> DE HBM copy before decoding starts.
            h2d = 0.0 if not self.spec.mode.io else job.request.total_tokens * self.bpt / self.spec.hardware.kv_cnic_bps
            self.env.timeout(h2d).callbacks.append(lambda _e, job=job: self._join_decode(job))
        self._kick()
        self._run_batch(pe)

    # -- decode --------------------------------------------------------------------------------------------

    def _join_decode(self, job: Job) -> None:
        de = self._de_by_id[job.de]
        now = self.env.now
        if de.join(job, now, self.spec.model.decode_step_seconds):
            self._wake(de)
        job.first_token = now + de.step_s
        job.tpot = now  # start of decode; turned into seconds per token at the finish

    def _wake(self, de: DecodeEngine) -> None:
        delay = de.next_finish_delay()
        if delay is not None:
            version = de.version
            self.env.timeout(delay).callbacks.append(lambda _e: self._decode_tick(de, version))

    def _decode_tick(self, de: DecodeEngine, version: int) -> None:
        if version != de.version:
            return
        now = self.env.now
        finished = de.finish_due(now, self.spec.model.decode_step_seconds)
        for job in finished:
            request = job.request
            job.finish = now
            job.tpot = (now - job.tpot) / max(request.gen_tokens, 1)
            del self.jobs[request.request_id]
            job.on_done(job)
        if finished:
            self._may_fetch.add(de.node_id)
            self._kick()
        self._wake(de)
