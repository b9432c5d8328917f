"""Endpoint: one NIXL agent, its registered grids, its peers and the ZMQ control plane between them.

Peers exchange a ``Hello`` (name, incarnation, address, NIXL metadata, grids) on connect, on every
(de)registration and after a restart. A peer that restarts (new incarnation) or re-registers memory
(new metadata) is forgotten and loaded again; one that disconnects is forgotten. Forgetting releases
every transfer handle, prepared list and the NIXL metadata of the peer, then fails its requests —
which the request layer (:class:`dualpath.transfer.channel.KVChannel`) keeps.
"""

from __future__ import annotations

import logging
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from dualpath.transfer.agent import KVAgent
from dualpath.transfer.completion import CompletionPoller
from dualpath.transfer.config import TransferConfig
from dualpath.transfer.control import ControlPlane
from dualpath.transfer.grid import LayerBlockGrid
from dualpath.transfer.limiter import PriorityLimiter
from dualpath.transfer.messages import Bye, Hello, Message

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    incarnation: str
    metadata: bytes
    grids: dict[str, LayerBlockGrid] = field(default_factory=dict)
    dlists: dict[str, Any] = field(default_factory=dict)



class Endpoint(ABC):
    """Registration, peer metadata exchange, reconnection and release; requests live in subclasses."""

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self.name = config.name
        self.incarnation = uuid.uuid4().hex
        self.agent = KVAgent(config)
        self.limiter = PriorityLimiter(config.limiter) if config.limiter else None
        self._poller = CompletionPoller(self.agent, self._on_notifs)
        self._cond = threading.Condition()
        self._grids: dict[str, LayerBlockGrid] = {}
        self._local_dlists: dict[str, Any] = {}
        self._peers: dict[str, _Peer] = {}
        self._refreshing: set[str] = set()  # peers being forgotten and loaded again
        self._control = ControlPlane(self.name, config.host, config.port, config.timeout_s,
                                     self._on_message, self._on_lost)

    @property
    def address(self) -> str:
        return self._control.address

    # -- registration and peers -----------------------------------------------------------------------
    def register(self, grid: LayerBlockGrid) -> None:
        """Register ``grid``'s region with NIXL, prepare its descriptors and tell connected peers.

        The channel holds addresses, not the memory: keep the buffer alive until :meth:`deregister`.
        """
        self.agent.register(grid)
        with self._cond:
            self._grids[grid.name] = grid
            self._local_dlists[grid.name] = self.agent.prep(None, grid)
        self._announce()

    def deregister(self, grid_name: str) -> None:
        with self._cond:
            if grid_name not in self._grids:
                raise ValueError(f"grid {grid_name!r} is not registered on {self.name!r}")
            del self._grids[grid_name]
            dlist = self._local_dlists.pop(grid_name)
        self.agent.release_dlist(dlist)
        self.agent.deregister(grid_name)
        self._announce()

    def _hello(self, reply: bool) -> Hello:
        with self._cond:
            grids = list(self._grids.values())
        return Hello(self.name, self.incarnation, self.address, self.agent.metadata(), grids, reply)

    def _announce(self) -> None:
        with self._cond:
            peers = list(self._peers)
        for peer in peers:
            self._control.send(peer, self._hello(reply=True))

    def connect(self, peer: str, address: str, timeout: float | None = None) -> None:
        """Exchange metadata with ``peer`` listening at ``address``; returns once both sides know each other."""
        self._control.connect(peer, address)
        self._control.send(peer, self._hello(reply=False))
        with self._cond:
            if not self._cond.wait_for(lambda: peer in self._peers, timeout or self.config.timeout_s):
                raise TimeoutError(f"{self.name}: no answer from {peer!r} at {address}")

    def peers(self) -> list[str]:
        with self._cond:
            return list(self._peers)

    def local_grids(self) -> dict[str, LayerBlockGrid]:
        with self._cond:
            return dict(self._grids)

    def peer_grids(self, peer: str) -> dict[str, LayerBlockGrid]:
        """The grids ``peer`` announced (empty when it is not connected)."""
        with self._cond:
            state = self._peers.get(peer)
            return dict(state.grids) if state is not None else {}

    def _on_lost(self, peer: str) -> None:
        self._forget(peer, "connection lost")
        self._control.send(peer, self._hello(reply=False))  # on the connection dialled again

    def _on_hello(self, peer: str, hello: Hello) -> None:
        with self._cond:
            known = self._peers.get(peer)
        restarted = known is not None and known.incarnation != hello.incarnation
        if known is not None and (restarted or known.metadata != hello.metadata or not hello.reply):
            # NIXL loads an agent's metadata once: new registrations mean forgetting the peer and
            # loading it again, which fails the requests in flight with it. A known peer that greets us
            # afresh has forgotten us (its connection dropped) and failed its side of those requests.
            with self._cond:
                self._refreshing.add(peer)
            reason = ("peer restarted" if restarted else "peer re-registered its memory"
                      if known.metadata != hello.metadata else "peer lost its connection to us")
            self._forget(peer, reason)
        # A restarted peer always gets a fresh connection, so that the old one's disconnect is ignored.
        if restarted or not self._control.connected_to(peer, hello.address):
            self._control.connect(peer, hello.address)
        self.agent.add_peer(hello.metadata)
        state = _Peer(hello.incarnation, hello.metadata)
        for grid in hello.grids:
            state.dlists[grid.name] = self.agent.prep(peer, grid)
            state.grids[grid.name] = grid
        with self._cond:
            self._peers[peer] = state
            self._refreshing.discard(peer)
            self._cond.notify_all()
        if not hello.reply:
            self._control.send(peer, self._hello(reply=True))

    def _forget(self, peer: str, reason: str) -> None:
        """Release everything prepared against ``peer``, then fail every request with it."""
        reason = f"{peer!r}: {reason}"
        with self._cond:
            state = self._peers.pop(peer, None)
            requests = self._take_requests(peer)
            self._cond.notify_all()
        if state is not None:
            clean = reason.endswith(("endpoint closed", "peer closed"))
            log.log(logging.INFO if clean else logging.WARNING, "%s: forgetting peer %s", self.name, reason)
        self._cancel_transfers(requests)
        if state is not None:
            for dlist in state.dlists.values():
                self.agent.release_dlist(dlist)
            self.agent.remove_peer(peer)
        self._fail_requests(requests, reason)

    def _on_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Hello):
            self._on_hello(peer, message)
        elif isinstance(message, Bye):
            with self._cond:
                state = self._peers.get(peer)
            if state is not None and state.incarnation == message.incarnation:
                self._forget(peer, "peer closed")
                self._control.drop(peer)
        else:
            self._on_request_message(peer, message)

    # -- what the request layer provides ------------------------------------------------------------------
    @abstractmethod
    def _take_requests(self, peer: str) -> Any:
        """Remove every request with ``peer`` from the tables (called under the lock)."""

    @abstractmethod
    def _cancel_transfers(self, requests: Any) -> None:
        """Release the transfer handles of taken requests (before their lists and peer go)."""

    @abstractmethod
    def _fail_requests(self, requests: Any, reason: str) -> None:
        """Report taken requests as failed, once every handle is released."""

    @abstractmethod
    def _on_request_message(self, peer: str, message: Message) -> None:
        """Handle a control message about one request."""

    @abstractmethod
    def _on_notifs(self, arrived: dict[str, list[bytes]]) -> None:
        """Handle NIXL notifications collected by the completion thread."""

    # -- state ------------------------------------------------------------------------------------------
    def _grid(self, name: str) -> LayerBlockGrid:
        with self._cond:
            grid = self._grids.get(name)
        if grid is None:
            raise ValueError(f"grid {name!r} is not registered on {self.name!r}")
        return grid

    def _close_endpoint(self) -> None:
        """Say goodbye, fail what is left, then release every handle, peer and registration."""
        for peer in self.peers():
            self._control.send(peer, Bye(self.incarnation))
            self._forget(peer, "endpoint closed")
        self._poller.close()
        self._control.close()
        self.agent.close()
        if self.limiter is not None:
            self.limiter.close()
