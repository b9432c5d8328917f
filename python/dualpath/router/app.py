"""The router's HTTP application: routes, error answers, start-up and graceful shutdown.

Shutdown (SIGTERM or SIGINT under ``run``): the listening socket closes first, so nothing new is accepted;
requests already accepted run to completion for up to ``shutdown_drain_s``; only then are the load poller
and the engine connections closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dualpath.router.admin import Admin
from dualpath.router.config import RouterConfig
from dualpath.router.decide import Decider
from dualpath.router.engines import EngineRegistry
from dualpath.router.metrics import RouterMetrics
from dualpath.router.protocol import HttpError, Route, parse_request, request_id
from dualpath.router.proxy import REQUEST_ID, Forwarder
from dualpath.router.store_view import StoreView
from dualpath.router.tokens import PromptTokenizer
from dualpath.scheduler.route_hint import ROUTING_KEY_HEADER

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    """An OpenAI-style error object, which SGLang clients already parse."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class Router:
    """The parts of one router; ``build_app`` wires them to an aiohttp Application."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.store = StoreView(config.store_root) if config.store_root else None
        self.registry = EngineRegistry(config, on_change=self._loads_changed)
        self.decider = Decider(config, self.registry, self.store)
        self.metrics = RouterMetrics(self.registry, self.decider, config.duration_buckets, config.mode)
        self.forwarder = Forwarder(config, self.registry, self.decider, self.metrics)
        self.tokenizer = PromptTokenizer.of(config)
        self.admin = Admin(config, self.registry, self.decider.members_changed, lambda: self.forwarder.session)

    def _loads_changed(self) -> None:
        self.decider.pump()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """Engine connections and the load poller live from start-up until after the shutdown drain."""
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                        connect=min(10.0, self.config.request_timeout_s))
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            self.forwarder.session = session
            await self.registry.poll_once(session)  # engines that are up are routable from the first request
            poller = asyncio.create_task(self.registry.poll_forever(session))
            try:
                yield
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
                if self.tokenizer is not None:
                    await asyncio.to_thread(self.tokenizer.close)

    def generation_route(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if request.content_length is not None and request.content_length > self.config.max_body_bytes:
                raise HttpError(413, f"request body of {request.content_length} bytes is over the "
                                f"{self.config.max_body_bytes}-byte limit")
            parsed = parse_request(route, await request.read(), self.registry.models,
                                   request.headers.get(ROUTING_KEY_HEADER))
            if self.tokenizer is not None and parsed.text_chars:  # encoding releases the GIL: the loop goes on
                parsed = await asyncio.to_thread(self.tokenizer.with_ids, parsed, self.decider.probe)
            started = time.monotonic()
            response = await self.forwarder.handle(request, parsed)
            self.metrics.generation(parsed.model_label, route, parsed.stream, time.monotonic() - started)
            return response

        return handle

    async def models(self, request: web.Request) -> web.Response:
        if not self.registry.models:
            return web.Response(status=503, text="No models available")
        data = [{"id": name, "object": "model", "owned_by": "sglang"} for name in sorted(self.registry.models)]
        return web.json_response({"object": "list", "data": data})

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def decisions(self, request: web.Request) -> web.Response:
        try:
            last = int(request.query.get("last", "100"))
        except ValueError:
            raise HttpError(400, f"'last' must be an integer, got {request.query['last']!r}") from None
        entries = list(self.decider.decisions)[-last:] if last > 0 else []
        return web.json_response({"decisions": entries})


ROUTER = web.AppKey("router", Router)
ERROR_KIND = web.RequestKey("error_kind", str)


@web.middleware
async def _observed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer carries the request's id (the client's, else a new one) in ``x-request-id``, and is counted
    in the stock router's HTTP metrics, as stock's."""
    router: Router = request.app[ROUTER]
    request[REQUEST_ID] = request_id(request.headers, router.config.request_id_headers, request.path)
    started = time.monotonic()
    response = await handler(request)
    if not response.prepared:  # a relayed stream set it before its first byte
        response.headers["x-request-id"] = request[REQUEST_ID]
    route = request.match_info.route.resource
    router.metrics.http(request.method, route.canonical if route is not None else "unmatched", response.status,
                        request.get(ERROR_KIND, ""), time.monotonic() - started)
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is a JSON answer with a message; the router itself never goes down with a request."""
    router: Router = request.app[ROUTER]
    try:
        return await handler(request)
    except HttpError as exc:
        error = exc
    except web.HTTPException as exc:  # aiohttp's own: no such route, body over client_max_size, ...
        if exc.status < 400:
            raise
        error = HttpError(exc.status, exc.text or exc.reason, "too_large" if exc.status == 413 else "no_route")
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client went away
    except Exception as exc:
        log.exception("unexpected error on %s", request.path)
        error = HttpError(500, f"router error: {type(exc).__name__}: {exc}")
    router.metrics.errors.labels(error.kind).inc()
    request[ERROR_KIND] = error.kind
    return error_response(error.status, error.message)


def build_app(config: RouterConfig) -> web.Application:
    """An aiohttp Application serving ``config``; run it with ``web.run_app`` or an AppRunner."""
    router = Router(config)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_observed, _errors])
    app[ROUTER] = router
    app.cleanup_ctx.append(router.lifetime)
    if config.prometheus_port and config.prometheus_port != config.port:
        app.cleanup_ctx.append(_prometheus_listener)
    app.add_routes([
        web.post("/generate", router.generation_route("generate")),
        web.post("/v1/completions", router.generation_route("completions")),
        web.post("/v1/chat/completions", router.generation_route("chat")),
        web.get("/v1/models", router.models),
        web.get("/metrics", router.metrics_page),
        web.get("/dualpath/decisions", router.decisions),
        *router.admin.routes(),
    ])
    return app


async def _prometheus_listener(app: web.Application) -> AsyncIterator[None]:
    """``/metrics`` on ``--prometheus-host:--prometheus-port`` too, as the stock router serves it."""
    config, metrics = app[ROUTER].config, web.Application()
    metrics.add_routes([web.get("/metrics", app[ROUTER].metrics_page)])
    runner = web.AppRunner(metrics, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.prometheus_host, config.prometheus_port).start()
        yield
    finally:
        await runner.cleanup()


def run(config: RouterConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain (see the module docstring)."""
    if config.ignored:
        log.warning("ignored (no meaning under the DualPath global scheduler, which places every request): %s",
                    " ".join(config.ignored))
    log.info("DualPath router (%s mode) on http://%s:%d: %d prefill, %d decode", config.mode, config.host,
             config.port, len(config.prefill), len(config.decode))
    web.run_app(build_app(config), host=config.host, port=config.port, shutdown_timeout=config.shutdown_drain_s,
                access_log=None, print=None)
