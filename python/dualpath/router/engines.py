"""The engines behind the router: who they are (``/dualpath/info``), what they serve, and how loaded they are.

Loads come from two sources. Every poll (``/v1/loads?include=core``) says what an engine holds; between
polls the router's own in-flight counts, changed at dispatch and completion, make decisions react at once.
An engine's load is ``in-flight now + external``, where ``external`` is what the last poll saw beyond the
router's own in-flight work at that moment (another router's requests, or an estimate that was low).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from dualpath.router.config import RouterConfig
from dualpath.router.store_view import StoreView, empty_queue
from dualpath.scheduler.messages import ReadSide, Role
from dualpath.scheduler.route_hint import RouteHint
from dualpath.store.node import ReadQueue

log = logging.getLogger(__name__)


def kv_channel(info: dict[str, Any]) -> str:
    """An engine's KV channel from ``/dualpath/info``: ``kv_channel``, or ``kv_agent`` at ``kv_endpoint``."""
    if info.get("kv_channel"):
        return str(info["kv_channel"])
    agent, endpoint = info.get("kv_agent"), info.get("kv_endpoint")
    return f"{agent}@{endpoint}" if agent and endpoint else ""


def _count(rank: dict[str, Any], key: str) -> int:
    value = rank.get(key)
    return int(value) if isinstance(value, int | float) and value > 0 else 0


@dataclass
class Engine:
    """One SGLang server and the router's view of it."""

    engine_id: int
    role: Role
    url: str
    bootstrap_port: int = 0
    # From /dualpath/info; a server without it (stock SGLang) is its own node and never reads on the DE side.
    discovered: bool = False
    dualpath: bool = False
    node: str = ""
    node_id: int = -1
    kv_channel: str = ""  # "agent@host:port" of its KV channel; DE-side reads need it on both engines
    page_size: int = 0
    store_namespace: str = ""  # published once SGLang built its host pool; asked again until then
    models: tuple[str, ...] = ()
    up: bool = False
    # The router's own unfinished work on this engine.
    inflight_reqs: int = 0
    inflight_tokens: int = 0
    inflight_hbm_tokens: int = 0
    # What the last poll saw beyond the router's own work, and the KV capacity (0: not reported).
    external_reqs: int = 0
    external_tokens: int = 0
    external_hbm_tokens: int = 0
    capacity_tokens: int = 0
    # Bumped on every change of what the scheduler is told, so that an unchanged report can be reused.
    version: int = 0
    last_error: str = field(default="", repr=False)

    @property
    def host(self) -> str:
        """The prefill's host as decode servers reach its bootstrap server."""
        return urlsplit(self.url).hostname or ""

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

    def set_up(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.version += 1

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

    def __init__(self, config: RouterConfig, store: StoreView | None, on_change: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.on_change = on_change
        self.prefill = [Engine(i, "prefill", spec.url, spec.bootstrap_port) for i, spec in enumerate(config.prefill)]
        self.decode = [Engine(len(self.prefill) + i, "decode", url) for i, url in enumerate(config.decode)]
        self.engines = self.prefill + self.decode
        self.node_ids: dict[str, int] = {}
        self.read_queues: dict[str, ReadQueue] = {}
        self.polls = 0

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
        """An engine call failed: place nothing on it until a poll finds it answering again."""
        if engine.up:
            log.warning("engine %s is down: %s", engine.url, reason)
        engine.set_up(False)

    async def poll_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.poll_once(session)
            await asyncio.sleep(self.config.load_poll_interval_s)

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, 5 * self.config.load_poll_interval_s))
        await asyncio.gather(*(self._poll_engine(session, engine, timeout) for engine in self.engines))
        if self.store is not None:
            self.read_queues = {node: self.store.read_queue(node) for node in self.dualpath_nodes()}
        self.polls += 1
        self.on_change()

    def read_queue(self, node: str) -> ReadQueue:
        return self.read_queues.get(node) or empty_queue(node)

    async def _poll_engine(self, session: aiohttp.ClientSession, engine: Engine,
                           timeout: aiohttp.ClientTimeout) -> None:
        try:
            if not engine.discovered or (engine.dualpath and not engine.store_namespace):
                await self._discover(session, engine, timeout)
            async with session.get(f"{engine.url}/v1/loads", params={"include": "core"}, timeout=timeout) as resp:
                resp.raise_for_status()
                engine.apply_loads(await resp.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if reason != engine.last_error:
                log.warning("engine %s: %s", engine.url, reason)
            engine.last_error = reason
            engine.set_up(False)
            return
        if not engine.up:
            log.info("engine %s (%s, node %s) is up", engine.url, engine.role, engine.node)
        engine.set_up(True)
        engine.last_error = ""

    async def _discover(self, session: aiohttp.ClientSession, engine: Engine, timeout: aiohttp.ClientTimeout) -> None:
        async with session.get(f"{engine.url}/dualpath/info", timeout=timeout) as resp:
            if resp.status == 404:
                info: dict[str, Any] = {}
            else:
                resp.raise_for_status()
                info = await resp.json(content_type=None)
                if not isinstance(info, dict):
                    raise ValueError(f"/dualpath/info answered {info!r}, not an object")
        if info and info.get("role") != engine.role:
            raise ValueError(f"/dualpath/info says role {info.get('role')!r} but it is listed as {engine.role}")
        engine.models = await self._served_models(session, engine, timeout)
        engine.dualpath = bool(info)
        engine.node = str(info.get("node") or "") if info else f"stock-{engine.engine_id}"
        if not engine.node:
            raise ValueError("/dualpath/info has no node name")
        engine.kv_channel = kv_channel(info)
        if engine.kv_channel:
            RouteHint(ReadSide.DE, engine.kv_channel, engine.kv_channel)  # fails now on names a hint cannot carry
        engine.page_size = int(info.get("page_size") or 0)
        engine.store_namespace = str(info.get("store_namespace") or "")
        engine.node_id = self.node_ids.setdefault(engine.node, len(self.node_ids))
        engine.discovered = True
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
