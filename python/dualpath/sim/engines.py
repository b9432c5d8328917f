"""State of the simulated hardware: requests in flight, storage NICs, prefill and decode engines."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from dualpath.scheduler import Chunk, EngineLoad, Request

StepTime = Callable[[int, int], float]  # (batch, context tokens) -> seconds per decode step


class Job:
    """One request's life in the cluster; timestamps are filled in as it advances."""

    __slots__ = (
        "arrival",
        "de",
        "de_read_tokens",
        "finish",
        "first_token",
        "on_done",
        "pe",
        "pending_reads",
        "prefill_done",
        "request",
        "tpot",
    )

    def __init__(self, request: Request, arrival: float, on_done: Callable[[Job], None]) -> None:
        self.request = request
        self.arrival = arrival
        self.on_done = on_done
        self.pe = self.de = -1
        self.pending_reads = self.de_read_tokens = 0
        self.prefill_done = self.first_token = self.finish = self.tpot = 0.0


class StorageNic:
    """A node's SNIC as a FIFO server: `pending` is the node's read queue in tokens (queued + in flight)."""

    __slots__ = ("busy_until", "bytes_read", "pending", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.busy_until = 0.0
        self.pending = 0
        self.bytes_read: dict[int, float] = {}


class PrefillEngine:
    """`seq`/`tok` change only through `place` and `release`, which also drop the cached load report."""

    __slots__ = ("_report", "busy", "engine_id", "node_id", "ready", "seq", "tok")

    def __init__(self, engine_id: int, node_id: int) -> None:
        self.engine_id, self.node_id = engine_id, node_id
        self.seq = self.tok = 0
        self.ready: deque[Chunk] = deque()
        self.busy = False
        self._report: EngineLoad | None = None

    def place(self, request: Request) -> None:
        self.seq += 1
        self.tok += request.total_tokens
        self._report = None

    def release(self, request: Request) -> None:
        self.seq -= 1
        self.tok -= request.total_tokens
        self._report = None

    def report(self) -> EngineLoad:
        """The load report for a fetch. Building a frozen message costs more than the fetch's decision, and
        many engines of a group are unchanged between two fetches, so it is kept until the load changes."""
        if self._report is None:
            self._report = EngineLoad(self.engine_id, self.node_id, self.seq, self.tok)
        return self._report


class DecodeEngine:
    """Decode as a fluid: a virtual step counter advances at 1/step_time; a request ends `gen` steps after
    it joined. Only joins and finishes are events. `seq`/`tok`/`reserved` change only in `place` and
    `finish_due`, which also drop the cached load report (see PrefillEngine.report)."""

    __slots__ = ("_report", "context", "engine_id", "finishing", "hbm_tokens", "last", "node_id", "reserved", "seq",
                 "step_s", "step_time", "steps", "tok", "version")

    def __init__(self, engine_id: int, node_id: int, hbm_tokens: int, step_time: StepTime) -> None:
        self.engine_id, self.node_id, self.hbm_tokens, self.step_time = engine_id, node_id, hbm_tokens, step_time
        self.seq = self.tok = self.reserved = self.context = 0
        self.finishing: list[tuple[float, int, Job]] = []
        self.steps = self.last = self.step_s = 0.0
        self.version = 0
        self._report: EngineLoad | None = None

    def place(self, request: Request) -> None:
        """Reserve HBM for a request assigned here (prompt + generation, for its whole decode)."""
        self.seq += 1
        self.tok += request.total_tokens
        self.reserved += request.hbm_tokens
        self._report = None

    def report(self) -> EngineLoad:
        if self._report is None:
            self._report = EngineLoad(self.engine_id, self.node_id, self.seq, self.tok,
                                      self.hbm_tokens - self.reserved)
        return self._report

    def _advance(self, now: float) -> None:
        if self.step_s > 0:
            self.steps += (now - self.last) / self.step_s
        self.last = now

    def _retime(self) -> None:
        self.step_s = self.step_time(len(self.finishing), self.context) if self.finishing else 0.0

    def join(self, job: Job, now: float) -> bool:
        """Add a request to the running batch. Returns whether the pending finish event must be replaced:
        only when the newcomer finishes first or the engine was idle. Otherwise the pending event fires
        early (steps only got slower), finds nothing due and re-arms, which is cheaper than an event per join."""
        self._advance(now)
        idle = not self.finishing
        request = job.request
        heapq.heappush(self.finishing, (self.steps + request.gen_tokens, request.request_id, job))
        self._account_context(request, +1)
        self._retime()
        wake = idle or self.finishing[0][2] is job
        if wake:
            self.version += 1
        return wake

    def finish_due(self, now: float) -> list[Job]:
        """Pop every request whose last step has run, release its HBM and tokens, re-time the batch."""
        self._advance(now)
        done = []
        while self.finishing and self.finishing[0][0] <= self.steps + 1e-9:
            job = heapq.heappop(self.finishing)[2]
            request = job.request
            self.seq -= 1
            self.tok -= request.total_tokens
            self.reserved -= request.hbm_tokens
            self._account_context(request, -1)
            done.append(job)
        if done:
            self._report = None
        self._retime()
        self.version += 1
        return done

    def _account_context(self, request: Request, sign: int) -> None:
        # A request's KV grows while it decodes; its mean size over the decode stands in for it.
        self.context += sign * (request.total_tokens + request.gen_tokens // 2)

    def next_finish_delay(self) -> float | None:
        if not self.finishing:
            return None
        return max(self.finishing[0][0] - self.steps, 0.0) * self.step_s
