"""Which request the storage backend is serving, and how the router said to read its KV.

SGLang calls the storage backend with page keys only. The hooks below record each request's
:class:`RouteHint` when it arrives and set the current request id around the controller calls that
run for one request (the storage hit query, the page transfer, the decode-side prefix match), so the
backend can look the hint up. Everything here is per process; scheduler threads share it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from dualpath.scheduler.messages import ReadSide
from dualpath.scheduler.report import KVChannelAddress
from dualpath.scheduler.route_hint import RouteHint

log = logging.getLogger(__name__)

# Requests whose hint is remembered; old ones are forgotten first (a request lives seconds, not hours).
CAPACITY = 65536


class Route(NamedTuple):
    rid: str
    room: int | None
    hint: RouteHint | None
    de_keys: frozenset[str] = frozenset()  # split reads: the page keys the DE reads (see ``split``)
    helper_keys: frozenset[str] = frozenset()  # split reads: the page keys the helper DE reads

    @property
    def side(self) -> ReadSide:
        """Where the request's hit pages are read: PE (stock, also without a hint), DE, or split between them."""
        return self.hint.side if self.hint is not None else ReadSide.PE

    def reads_on(self, key: str) -> ReadSide:
        """The side that reads the page ``key``: DE for the request's DE, PE for the prefill or a helper."""
        side = self.side
        if side is ReadSide.SPLIT:
            return ReadSide.DE if key in self.de_keys else ReadSide.PE
        return side

    def reader(self, key: str) -> KVChannelAddress | None:
        """The KV channel of the DE that reads the page ``key`` for the prefill; None for the prefill's own NIC."""
        if self.side is ReadSide.DE or key in self.de_keys:
            return self.hint.de_channel
        return self.hint.helper_channel if key in self.helper_keys else None


_routes: OrderedDict[str, Route] = OrderedDict()
# Called on the scheduler thread for every arriving request (route, prompt ids); must not block.
_arrival_listeners: list[Callable[[Route, list[int]], None]] = []
_lock = threading.Lock()
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("dualpath_current_rid", default=None)


def record(rid: str, room: int | None, routing_key: str | None) -> Route:
    try:
        hint = RouteHint.decode(routing_key)
    except ValueError as exc:
        log.warning("request %s: %s; reading its KV on the PE side", rid, exc)
        hint = None
    route = Route(rid, room, hint)
    with _lock:
        _routes[rid] = route
        _routes.move_to_end(rid)
        while len(_routes) > CAPACITY:
            _routes.popitem(last=False)
    return route


def split(route: Route, de_keys: frozenset[str], helper_keys: frozenset[str] = frozenset()) -> Route:
    """Record which pages of a split-read request the DE reads (the keys of its leading ``de_tokens``) and
    which its helper reads (the next ``helper_tokens``)."""
    route = route._replace(de_keys=de_keys, helper_keys=helper_keys)
    with _lock:
        if route.rid in _routes:
            _routes[route.rid] = route
    return route


def on_arrival(listener: Callable[[Route, list[int]], None]) -> None:
    """Have ``listener`` told of every request as it arrives (the PE starts DE reads early with it)."""
    _arrival_listeners.append(listener)


def current() -> Route:
    """The route of the request the calling thread serves (PE side, stock, when unknown)."""
    rid = _current.get()
    with _lock:
        route = _routes.get(rid) if rid is not None else None
    return route or Route(rid or "", None, None)


def _serving(rid: str, call: Callable[[], Any]) -> Any:
    token = _current.set(rid)
    try:
        return call()
    finally:
        _current.reset(token)


def on_add_request(original: Callable[..., Any], scheduler: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    route = record(req.rid, getattr(req, "bootstrap_room", None), getattr(req, "routing_key", None))
    for listener in _arrival_listeners:
        listener(route, req.origin_input_ids)
    return _serving(req.rid, lambda: original(scheduler, req, *args, **kwargs))


def on_operation(original: Callable[..., Any], controller: Any, operation: Any, *args: Any, **kwargs: Any) -> Any:
    return _serving(operation.request_id, lambda: original(controller, operation, *args, **kwargs))


def on_prefix_match(original: Callable[..., Any], queue: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    return _serving(req.rid, lambda: original(queue, req, *args, **kwargs))
