"""The stock router's service routes, with sglang-router 0.3.2's semantics (checked against the real package).

- ``/liveness`` and ``/health``: 200 while the router process serves (a liveness probe never restarts it
  because workers are loading); ``/readiness`` and ``/health_generate``: 200 once a prefill and a decode
  server are up, else 503.
- ``/get_server_info``: the router's own (worker counts, mode); ``/get_model_info``: the first prefill
  server's that is up; ``/get_loads``: each worker's load as the router schedules it.
- ``POST /flush_cache``: every worker's ``/flush_cache``.
- ``/workers``: list (``GET``), add (``POST {"url", "worker_type", "bootstrap_port"}``, 202), show and
  remove (``GET``/``DELETE /workers/{worker_id}``); the scheduler places on a new server once a poll finds it
  up, and nothing new on a removed one (what it holds finishes).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from dualpath.router.config import RouterConfig
from dualpath.router.engines import Engine, EngineRegistry
from dualpath.router.protocol import HttpError

FLUSH_TIMEOUT_S = 60.0


def worker_json(engine: Engine) -> dict[str, Any]:
    return {"id": engine.worker_id, "url": engine.url, "model_id": engine.models[0] if engine.models else "",
            "worker_type": engine.role, "is_healthy": engine.up, "load": engine.seq,
            "bootstrap_port": engine.bootstrap_port,
            "metadata": {"node": engine.node, "dualpath": engine.dualpath, "disaggregation_mode": engine.role}}


class Admin:
    """Handlers of the service routes; ``members_changed`` tells the scheduler about joins and leaves."""

    def __init__(self, config: RouterConfig, registry: EngineRegistry, members_changed: Callable[[], None],
                 session: Callable[[], aiohttp.ClientSession]) -> None:
        self.config, self.registry = config, registry
        self._members_changed, self._session = members_changed, session

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/liveness", self.liveness), web.get("/health", self.liveness),
            web.get("/readiness", self.readiness), web.get("/health_generate", self.health_generate),
            web.get("/get_server_info", self.server_info), web.get("/get_model_info", self.model_info),
            web.get("/get_loads", self.loads), web.post("/flush_cache", self.flush_cache),
            web.get("/workers", self.list_workers), web.post("/workers", self.add_worker),
            web.get("/workers/{worker_id}", self.show_worker), web.delete("/workers/{worker_id}", self.remove_worker),
        ]

    @property
    def ready(self) -> bool:
        return any(e.up for e in self.registry.prefill) and any(e.up for e in self.registry.decode)

    async def liveness(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def readiness(self, request: web.Request) -> web.Response:
        engines = self.registry.engines
        if not self.ready:
            return web.json_response({"status": "not ready", "reason": "insufficient healthy workers"}, status=503)
        return web.json_response({"status": "ready", "healthy_workers": sum(e.up for e in engines),
                                  "total_workers": len(engines)})

    async def health_generate(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.Response(status=503, text="No prefill/decode pair with healthy workers available")
        return web.Response(text="A prefill/decode pair has healthy workers")

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"routers_count": 1, "workers_count": len(self.registry.engines),
                                  "dualpath_mode": self.config.mode,
                                  "prefill": [e.url for e in self.registry.prefill],
                                  "decode": [e.url for e in self.registry.decode]})

    async def model_info(self, request: web.Request) -> web.Response:
        engine = next((e for e in self.registry.prefill if e.up), None)
        if engine is None:
            raise HttpError(503, "No prefill servers available", "no_capacity")
        try:
            async with self._session().get(f"{engine.url}/get_model_info") as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise HttpError(502, f"{engine.url}/get_model_info failed: {exc}", "upstream") from exc

    async def loads(self, request: web.Request) -> web.Response:
        return web.json_response({"workers": [{"worker": e.url, "load": e.seq} for e in self.registry.engines]})

    async def flush_cache(self, request: web.Request) -> web.Response:
        engines = self.registry.engines
        results = await asyncio.gather(*(self._flush(engine) for engine in engines))
        failed = [f"{engine.url} ({reason})" for engine, reason in zip(engines, results, strict=True) if reason]
        flushed = len(engines) - len(failed)
        body = {"status": "success" if not failed else "error", "workers_flushed": flushed,
                "total_http_workers": len(engines), "total_workers": len(engines),
                "message": f"Successfully flushed cache on all {flushed} HTTP workers" if not failed
                else f"flushed {flushed} of {len(engines)} workers; failed: {', '.join(failed)}"}
        return web.json_response(body, status=200 if not failed else 502)

    async def _flush(self, engine: Engine) -> str:
        """'' when ``engine`` flushed its cache, else why not."""
        try:
            async with self._session().post(f"{engine.url}/flush_cache",
                                            timeout=aiohttp.ClientTimeout(total=FLUSH_TIMEOUT_S)) as resp:
                return "" if resp.status == 200 else f"HTTP {resp.status}: {(await resp.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def list_workers(self, request: web.Request) -> web.Response:
        engines = self.registry.engines
        return web.json_response({"workers": [worker_json(e) for e in engines], "total": len(engines),
                                  "stats": {"prefill_count": len(self.registry.prefill),
                                            "decode_count": len(self.registry.decode), "regular_count": 0}})

    async def show_worker(self, request: web.Request) -> web.Response:
        return web.json_response(worker_json(self._worker(request)))

    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise HttpError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("url"), str):
            raise HttpError(400, 'expected {"url": "http://host:port", "worker_type": "prefill" | "decode"}')
        port = body.get("bootstrap_port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise HttpError(400, f"bootstrap_port must be an integer in 1..65535, got {port!r}")
        try:
            engine = self.registry.add(body.get("worker_type", "decode"), body["url"], port)
        except ValueError as exc:
            raise HttpError(409 if "already" in str(exc) else 400, str(exc)) from None
        self._members_changed()
        return web.json_response({"status": "accepted", "worker_id": engine.worker_id, "url": engine.url,
                                  "location": f"/workers/{engine.worker_id}",
                                  "message": "Worker added; requests are placed on it once it answers its polls"},
                                 status=202)

    async def remove_worker(self, request: web.Request) -> web.Response:
        engine = self._worker(request)
        try:
            self.registry.remove(engine)
        except ValueError as exc:
            raise HttpError(409, str(exc)) from None
        self._members_changed()
        return web.json_response({"status": "accepted", "worker_id": engine.worker_id,
                                  "message": "Worker removed; requests it holds finish"}, status=202)

    def _worker(self, request: web.Request) -> Engine:
        worker_id = request.match_info["worker_id"]
        engine = self.registry.by_worker_id(worker_id)
        if engine is None:
            raise HttpError(404, f"Worker {worker_id} not found", "unknown_worker")
        return engine
