"""The engines behind the router: who they are, what they serve, and how loaded they are.

Everything comes over the network: each poll asks a DualPath server for its :class:`NodeReport`
(``/dualpath/info``: role, node, KV channel, store namespace, its node's storage-NIC read queue) and every
server for ``/v1/loads``. A server without ``/dualpath/info`` (stock SGLang) is its own node and never
reads on the DE side. An engine whose polls have failed for ``report_timeout_s`` is down.

Loads come from two sources. Every poll (``/v1/loads?include=core``) says what an engine holds; between
polls the router's own in-flight counts, changed at dispatch and completion, make decisions react at once.
An engine's load is ``in-flight now + external``, where ``external`` is what the last poll saw beyond the
router's own in-flight work at that moment (another router's requests, or an estimate that was low).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from dualpath.router.breaker import CircuitBreaker
from dualpath.router.config import RouterConfig, check_url
from dualpath.scheduler.messages import Role
from dualpath.scheduler.report import REPORT_ROUTE, KVChannelAddress, NodeReport

log = logging.getLogger(__name__)


def _count(rank: dict[str, Any], key: str) -> int:
    value = rank.get(key)
    return int(value) if isinstance(value, int | float) and value > 0 else 0


@dataclass
class Engine:
    """One SGLang server and the router's view of it."""

    engine_id: int
    role: Role
    url: str
    bootstrap_port: int | None = None  # None: the requests carry none (as the stock router)
    worker_id: str = field(default_factory=lambda: str(uuid.uuid4()))  # its name in the /workers API, as stock
    # From its reports; a server without them (stock SGLang) is its own node and never reads on the DE side.
    discovered: bool = False
    dualpath: bool = False
    node: str = ""
    node_id: int = -1
    report: NodeReport | None = None  # the last one
    reported_at: float = 0.0  # monotonic time of the last successful poll
    models: tuple[str, ...] = ()
    up: bool = False
    down_until: float = 0.0  # monotonic time before which polls do not bring it back after a failed request
    # The router's own unfinished work on this engine.
    inflight_reqs: int = 0
    inflight_tokens: int = 0
    inflight_hbm_tokens: int = 0
    # What the last poll saw beyond the router's own work, and the KV capacity (0: not reported).
    external_reqs: int = 0
    external_tokens: int = 0
    external_hbm_tokens: int = 0
    capacity_tokens: int = 0
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    # Bumped on every change of what the scheduler is told, so that an unchanged report can be reused.
    version: int = 0
    last_error: str = field(default="", repr=False)

    @property
    def host(self) -> str:
        """The prefill's host as decode servers reach its bootstrap server."""
        return urlsplit(self.url).hostname or ""

    @property
    def kv_channel(self) -> KVChannelAddress | None:
        """Its KV channel; DE-side reads need it on both engines."""
        return self.report.kv_channel if self.report is not None and self.report.ready else None

    @property
    def page_size(self) -> int:
        return self.report.page_size if self.report is not None else 0

    @property
    def tp_size(self) -> int:
        return self.report.tp_size if self.report is not None else 1

    @property
    def store_namespace(self) -> str:
        return self.report.store_namespace if self.report is not None else ""

    @property
    def seq(self) -> int:
        return self.inflight_reqs + self.external_reqs

    @property
    def tokens(self) -> int:
        return self.inflight_tokens + self.external_tokens

    @property
    def free_hbm_tokens(self) -> int | None:
        """Free KV slots, or None when the engine does not report its capacity."""
        if not self.capacity_tokens:
            return None
        return self.capacity_tokens - self.inflight_hbm_tokens - self.external_hbm_tokens

    @property
    def routable(self) -> bool:
        """Up (it answers its polls) and its circuit breaker not open (its requests do not keep failing)."""
        return self.up and self.breaker.allows

    def set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.version += 1

    def record(self, success: bool) -> None:
        """A request's outcome on this engine, for its circuit breaker."""
        self._breaker_changed(self.breaker.record(success, time.monotonic()))

    def tick(self, now: float) -> None:
        """Its circuit breaker half-opens once its open time is over."""
        self._breaker_changed(self.breaker.tick(now))

    def _breaker_changed(self, changed: bool) -> None:
        if changed:  # what the scheduler is told changes
            self.version += 1
            log.warning("engine %s: circuit breaker %s", self.url, self.breaker.state.name.lower())

    def charge(self, reqs: int, tokens: int, hbm_tokens: int) -> None:
        self.version += 1
        self.inflight_reqs += reqs
        self.inflight_tokens += tokens
        self.inflight_hbm_tokens += hbm_tokens

    def apply_loads(self, payload: object) -> None:
        """Take a ``/v1/loads`` answer: a ``loads`` list of per-DP-rank dicts; missing numbers count as 0."""
        ranks = payload.get("loads") if isinstance(payload, dict) else None
        if not isinstance(ranks, list):
            raise ValueError(f"{self.url}/v1/loads has no 'loads' list")
        ranks = [rank for rank in ranks if isinstance(rank, dict)]
        reqs = sum(_count(r, "num_running_reqs") + _count(r, "num_waiting_reqs") for r in ranks)
        used = sum(_count(r, "num_used_tokens") for r in ranks)
        queued = sum(_count(r, "num_waiting_uncached_tokens") for r in ranks)
        self.external_reqs = max(0, reqs - self.inflight_reqs)
        self.external_tokens = max(0, used + queued - self.inflight_tokens)
        self.external_hbm_tokens = max(0, used - self.inflight_hbm_tokens)
        self.capacity_tokens = sum(_count(r, "max_total_num_tokens") for r in ranks)
        self.version += 1


class EngineRegistry:
    """All engines, their nodes and the nodes' store read queues, refreshed by ``poll_forever``."""

    def __init__(self, config: RouterConfig, on_change: Callable[[], None]) -> None:
        self.config = config
        self.on_change = on_change
        self._ids = itertools.count()  # never reused: a removed engine's late releases touch only its own object
        self.prefill = [self._engine("prefill", spec.url, spec.bootstrap_port) for spec in config.prefill]
        self.decode = [self._engine("decode", url) for url in config.decode]
        self.node_ids: dict[str, int] = {}
        self.polls = 0

    @property
    def engines(self) -> list[Engine]:
        return self.prefill + self.decode

    def add(self, role: Role, url: str, bootstrap_port: int | None = None) -> Engine:
        """A server joins (placed on once a poll finds it up); ValueError for a bad or known URL."""
        url = check_url(url)
        if role not in ("prefill", "decode"):
            raise ValueError(f"worker_type must be 'prefill' or 'decode', got {role!r}")
        if any(engine.url == url for engine in self.engines):
            raise ValueError(f"{url} is already a worker")
        engine = self._engine(role, url, bootstrap_port)
        (self.prefill if role == "prefill" else self.decode).append(engine)
        log.info("engine %s (%s) added", url, role)
        return engine

    def _engine(self, role: Role, url: str, bootstrap_port: int | None = None) -> Engine:
        return Engine(next(self._ids), role, url, bootstrap_port, breaker=CircuitBreaker(self.config.breaker))

    def remove(self, engine: Engine) -> None:
        """A server leaves: nothing new is placed on it; what it holds finishes. The last of a role stays."""
        group = self.prefill if engine.role == "prefill" else self.decode
        if len(group) == 1:
            raise ValueError(f"{engine.url} is the last {engine.role} server; add another before removing it")
        group.remove(engine)
        log.info("engine %s (%s) removed", engine.url, engine.role)

    def by_worker_id(self, worker_id: str) -> Engine | None:
        return next((engine for engine in self.engines if engine.worker_id == worker_id), None)

    @property
    def models(self) -> set[str]:
        return {model for engine in self.engines for model in engine.models}

    @property
    def page_size(self) -> int | None:
        """The block size of hit estimates: the option, else the first page size a DualPath server reports."""
        if self.config.store_block_tokens:
            return self.config.store_block_tokens
        return next((e.page_size for e in self.engines if e.dualpath and e.page_size > 0), None)

    @property
    def store_namespace(self) -> str | None:
        """Where hit estimates look: the option, else the first namespace a DualPath server reports."""
        if self.config.store_namespace:
            return self.config.store_namespace
        return next((e.store_namespace for e in self.engines if e.store_namespace), None)

    def dualpath_nodes(self) -> list[str]:
        return sorted({engine.node for engine in self.engines if engine.dualpath})

    def mark_down(self, engine: Engine, reason: str) -> None:
        """A request failed on the engine: place nothing on it until a poll finds it answering again, not sooner
        than ``report_timeout_s`` (so that the request's retry goes to another pair), and while its circuit
        breaker lets it take requests."""
        if engine.up:
            log.warning("engine %s is down: %s", engine.url, reason)
        engine.set_up(False)
        engine.down_until = time.monotonic() + self.config.report_timeout_s
        engine.record(False)

    async def poll_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.poll_once(session)
            await asyncio.sleep(self.config.load_poll_interval_s)

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(5 * self.config.load_poll_interval_s,
                                                           self.config.report_timeout_s)))
        await asyncio.gather(*(self._poll_engine(session, engine, timeout) for engine in self.engines))
        now = time.monotonic()
        for engine in self.engines:
            engine.tick(now)
        self.polls += 1
        self.on_change()

    def node_report(self, node: str) -> NodeReport | None:
        """The freshest report on ``node``'s storage NIC from an engine that is up (every server of a node
        reports the same node-wide queue)."""
        engines = [e for e in self.engines if e.node == node and e.up and e.report is not None]
        return max(engines, key=lambda e: e.reported_at).report if engines else None

    async def _poll_engine(self, session: aiohttp.ClientSession, engine: Engine,
                           timeout: aiohttp.ClientTimeout) -> None:
        try:
            if not engine.discovered or engine.dualpath:
                await self._report(session, engine, timeout)
            async with session.get(f"{engine.url}/v1/loads", params={"include": "core"}, timeout=timeout) as resp:
                resp.raise_for_status()
                engine.apply_loads(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if reason != engine.last_error:
                log.warning("engine %s: %s", engine.url, reason)
            engine.last_error = reason
            if time.monotonic() - engine.reported_at >= self.config.report_timeout_s:
                engine.set_up(False)
            return
        engine.reported_at = time.monotonic()
        engine.last_error = ""
        if engine.reported_at < engine.down_until:
            return
        if not engine.up:
            log.info("engine %s (%s, node %s) is up", engine.url, engine.role, engine.node)
        engine.set_up(True)

    async def _report(self, session: aiohttp.ClientSession, engine: Engine, timeout: aiohttp.ClientTimeout) -> None:
        """Take the engine's node report (the first one also names its node and models)."""
        async with session.get(f"{engine.url}{REPORT_ROUTE}", timeout=timeout) as resp:
            if resp.status == 404 and not engine.discovered:
                report = None
            else:
                resp.raise_for_status()
                report = NodeReport.decode(await resp.read())
        if report is not None and report.role != engine.role:
            raise ValueError(f"{REPORT_ROUTE} says role {report.role!r} but it is listed as {engine.role}")
        if not engine.discovered:
            engine.models = await self._served_models(session, engine, timeout)
            engine.dualpath = report is not None
            engine.node = report.node if report is not None else f"stock-{engine.engine_id}"
            engine.node_id = self.node_ids.setdefault(engine.node, len(self.node_ids))
            engine.discovered = True
        elif report.node != engine.node:
            raise ValueError(f"{REPORT_ROUTE} now names node {report.node!r}, was {engine.node!r}")
        if report != engine.report:
            engine.report = report
            engine.version += 1

    @staticmethod
    async def _served_models(session: aiohttp.ClientSession, engine: Engine,
                             timeout: aiohttp.ClientTimeout) -> tuple[str, ...]:
        """Model ids from ``/v1/models``; a server that does not answer it serves unnamed models."""
        try:
            async with session.get(f"{engine.url}/v1/models", timeout=timeout) as resp:
                resp.raise_for_status()
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("engine %s: no model list (%s); model names are not checked against it", engine.url, exc)
            return ()
        entries = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(entries, list):
            return ()
        return tuple(str(e["id"]) for e in entries if isinstance(e, dict) and "id" in e)
