"""Which request the storage backend is serving, and how the router said to read its KV.

SGLang calls the storage backend with page keys only. The hooks below record each request's
:class:`RouteHint` when it arrives and set the current request id around the controller calls that
run for one request (the storage hit query, the page transfer, the decode-side prefix match), so the
backend can look the hint up. The routes live in the storage backend (:attr:`DualPathStorage.routes`),
which SGLang's scheduler owns; the hooks find it through the object they wrap.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from dualpath.scheduler.messages import ReadSide
from dualpath.scheduler.route_hint import Reader, RouteHint
from dualpath.srt import surface

log = logging.getLogger(__name__)

# Requests whose hint is remembered; old ones are forgotten first (a request lives seconds, not hours).
CAPACITY = 65536


class Route(NamedTuple):
    rid: str
    room: int | None
    hint: RouteHint | None
    page_readers: Mapping[str, Reader] = MappingProxyType({})  # see ReadPlan.page_readers

    @property
    def side(self) -> ReadSide:
        """Where the request's hit pages are read: PE (stock, also without a hint), DE, or split between them."""
        return self.hint.side if self.hint is not None else ReadSide.PE

    def reader(self, key: str) -> Reader:
        """Who reads the page ``key`` for the prefill: a DE's KV channel, or None for the prefill's own NIC."""
        return self.hint.plan.reader(key, self.page_readers) if self.hint is not None else None

    def read_by_de(self, key: str) -> bool:
        """Whether the request's own DE reads the page ``key`` (for itself and the prefill)."""
        return self.hint is not None and self.hint.de_channel is not None and self.reader(key) == self.hint.de_channel


class RequestRoutes:
    """The routes of the requests one storage backend serves, and the request each thread serves now."""

    def __init__(self, page_size: int, capacity: int = CAPACITY) -> None:
        self._page_size = page_size
        self._capacity = capacity
        self._routes: OrderedDict[str, Route] = OrderedDict()
        self._lock = threading.Lock()
        self._current: contextvars.ContextVar[str | None] = contextvars.ContextVar("dualpath_rid", default=None)

    def arrive(self, rid: str, room: int | None, routing_key: str | None, input_ids: list[int]) -> Route:
        try:
            hint = RouteHint.decode(routing_key)
        except ValueError as exc:
            log.warning("request %s: %s; reading its KV on the PE side", rid, exc)
            hint = None
        route = Route(rid, room, hint, hint.plan.page_readers(input_ids, self._page_size) if hint is not None else {})
        with self._lock:
            self._routes[rid] = route
            self._routes.move_to_end(rid)
            while len(self._routes) > self._capacity:
                self._routes.popitem(last=False)
        return route

    def get(self, rid: str) -> Route | None:
        with self._lock:
            return self._routes.get(rid)

    def current(self) -> Route:
        """The route of the request the calling thread serves (PE side, stock, when unknown)."""
        rid = self._current.get()
        with self._lock:
            route = self._routes.get(rid) if rid is not None else None
        return route or Route(rid or "", None, None)

    def serving(self, rid: str, call: Callable[[], Any]) -> Any:
        """``call()`` on behalf of request ``rid``."""
        token = self._current.set(rid)
        try:
            return call()
        finally:
            self._current.reset(token)


def _routes_of(owner: Any) -> RequestRoutes | None:
    routes = getattr(surface.storage_backend(owner), "routes", None)
    return routes if isinstance(routes, RequestRoutes) else None


def _serving(owner: Any, rid: Callable[[], str], call: Callable[[], Any]) -> Any:
    """``call()`` on behalf of request ``rid()`` where ``owner``'s storage backend is DualPath's."""
    routes = _routes_of(owner)
    return call() if routes is None else routes.serving(rid(), call)


def on_add_request(original: Callable[..., Any], scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    routes = _routes_of(scheduler)
    if routes is not None:
        route = routes.arrive(*surface.arrival(req))
        if route.hint is not None:  # SGLang counts requests per routing key: the client's, not the router's hint
            surface.set_routing_key(req, route.hint.client_key or None)
    return _serving(scheduler, lambda: surface.request_id(req), lambda: original(scheduler, req, *args, **kwargs))


def on_prefetch(original: Callable[..., Any], cache: Any, rid: str, last_host_node: Any, new_input_tokens: list[int],
                last_hash: str | None = None, *args: Any, **kwargs: Any) -> Any:
    """AROUND HiCache's ``prefetch_from_storage``: where it starts a prefetch, DualPath's backend starts reading those
    pages at once (``DualPathStorage.prefetching``). Where it does not, it recomputes them: reading them would be
    wasted."""
    result = original(cache, rid, last_host_node, new_input_tokens, last_hash, *args, **kwargs)
    backend = surface.storage_backend(cache.cache_controller)
    if surface.prefetch_issued(cache, rid) and callable(prefetching := getattr(backend, "prefetching", None)):
        prefetching(rid, new_input_tokens, last_hash)
    return result


def on_operation(original: Callable[..., Any], controller: Any, operation: Any, *args: Any, **kwargs: Any) -> Any:
    rid = surface.operation_request_id(operation)
    if rid is None:  # an inline hit query: it serves the request its caller serves (the decode's prefix match)
        return original(controller, operation, *args, **kwargs)
    return _serving(controller, lambda: rid, lambda: original(controller, operation, *args, **kwargs))


def on_prefix_match(original: Callable[..., Any], queue: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    return _serving(queue, lambda: surface.request_id(req), lambda: original(queue, req, *args, **kwargs))
