"""ZMQ control plane of one endpoint: a ROUTER that receives, one DEALER per peer that sends.

One thread receives and decodes messages and watches every DEALER's monitor socket: a peer that dies
drops its TCP connection at once, a peer that stalls stops answering ZMTP heartbeats, and both surface
as a disconnect event — the fast failure signal that transfer timeouts only back up. A lost connection
is dialled again at once, so that the peer hears from us as soon as it can (a live peer whose connection
merely dropped must learn that our side failed the requests it shares with us).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from dualpath.transfer.messages import Message, decoder, encoder

log = logging.getLogger(__name__)


# Routine while a connection comes up, or while it is dialled again to a peer that is gone.
_QUIET_EVENTS = (zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                 | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# libzmq keeps the peer's heartbeat TTL in 16-bit milliseconds: a TTL of 65.6 s or more wraps around
# (215 s becomes 18.4 s) and the peer drops a live connection that is idle that long after a PING
# (zeromq/libzmq#4226, open in 4.3.5). Stalled peers are caught within this bound; dead ones at once.
MAX_HEARTBEAT_MS = 60_000


class _Peer:
    def __init__(self, socket: zmq.Socket, monitor: zmq.Socket, address: str) -> None:
        self.socket, self.monitor, self.address = socket, monitor, address
        self.lock = threading.Lock()  # a ZMQ socket is used by one thread at a time
        self.connected_at: float | None = None


class ControlPlane:
    """Sends and receives :mod:`messages`; calls ``on_message(peer, msg)`` and ``on_lost(peer)``."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        heartbeat_s: float,
        on_message: Callable[[str, Message], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.name = name
        self._heartbeat_ms = min(max(1, int(heartbeat_s * 1000)), MAX_HEARTBEAT_MS)
        self._on_message, self._on_lost = on_message, on_lost
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes over its old identity
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(f"tcp://{host}:{port}")
        self.address: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        wake_addr = f"inproc://wake-{uuid.uuid4().hex}"
        self._wake_rx = self._ctx.socket(zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.connect(wake_addr)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._watch: list[tuple[str, zmq.Socket]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"control-{name}", daemon=True)
        self._thread.start()

    def connect(self, peer: str, address: str) -> None:
        """(Re)connect the sending side to ``peer`` at ``address``, replacing an older connection."""
        socket = self._ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.IDENTITY, self.name.encode())
        socket.setsockopt(zmq.LINGER, 200)
        socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, self._heartbeat_ms // 3))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, self._heartbeat_ms)
        socket.setsockopt(zmq.HEARTBEAT_TTL, self._heartbeat_ms)
        monitor = socket.get_monitor_socket(zmq.EVENT_ALL & ~_QUIET_EVENTS)
        socket.connect(address)
        with self._lock:
            old = self._peers.pop(peer, None)
            self._peers[peer] = _Peer(socket, monitor, address)
            self._watch.append((peer, monitor))
        if old is not None:
            self._close_peer(old)
        self._wake()

    def connected_to(self, peer: str, address: str) -> bool:
        with self._lock:
            entry = self._peers.get(peer)
            return entry is not None and entry.address == address

    def send(self, peer: str, message: Message) -> bool:
        """Queue ``message`` for ``peer``; False when there is no connection to it."""
        with self._lock:
            entry = self._peers.get(peer)
        if entry is None:
            return False
        with entry.lock:
            try:
                entry.socket.send(encoder.encode(message), zmq.NOBLOCK)
            except zmq.ZMQError:
                return False
        return True

    def drop(self, peer: str) -> None:
        with self._lock:
            entry = self._peers.pop(peer, None)
        if entry is not None:
            self._close_peer(entry)

    def _close_peer(self, entry: _Peer) -> None:
        with entry.lock:
            entry.socket.disable_monitor()
            entry.socket.close()
        self._wake()  # the control thread closes the monitor socket it polls

    def _wake(self) -> None:
        with self._lock:
            if not self._closing:
                self._wake_tx.send(b"")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        watched: dict[zmq.Socket, str] = {}
        while True:
            events = dict(poller.poll())
            if self._wake_rx in events:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
                with self._lock:
                    closing, new, self._watch = self._closing, self._watch, []
                    live = {entry.monitor for entry in self._peers.values()}
                for peer, monitor in new:
                    watched[monitor] = peer
                    poller.register(monitor, zmq.POLLIN)
                for monitor in [m for m in watched if m not in live or closing]:
                    poller.unregister(monitor)
                    monitor.close(0)
                    del watched[monitor]
                if closing:
                    return
            if self._router in events:
                self._receive()
            for monitor in [m for m in watched if m in events]:
                self._monitor_event(watched[monitor], monitor)

    def _receive(self) -> None:
        while self._router.poll(0):
            identity, payload = self._router.recv_multipart()
            try:
                message = decoder.decode(payload)
            except Exception:
                log.warning("%s: undecodable control message from %r dropped", self.name, identity)
                continue
            try:
                self._on_message(identity.decode(), message)
            except Exception:
                log.exception("%s: handling %s from %r failed", self.name, type(message).__name__, identity)

    def _monitor_event(self, peer: str, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            event = parse_monitor_message(monitor.recv_multipart())
            with self._lock:
                entry = self._peers.get(peer)
            if entry is None or entry.monitor is not monitor:
                continue
            kind = zmq.Event(event["event"])
            if kind == zmq.EVENT_CONNECTED:
                entry.connected_at = time.monotonic()
                log.debug("%s: control connection to %r at %s up (fd %s)", self.name, peer, entry.address,
                          event["value"])
            elif kind == zmq.EVENT_DISCONNECTED:
                up = "" if entry.connected_at is None else f" after {time.monotonic() - entry.connected_at:.1f} s"
                log.warning("%s: control connection to %r at %s dropped%s (fd %s); dialling again",
                            self.name, peer, entry.address, up, event["value"])
                self.connect(peer, entry.address)
                self._on_lost(peer)
            else:
                log.info("%s: control connection to %r: %s (%s)", self.name, peer, kind.name, event["value"])

    def close(self) -> None:
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for entry in peers:
            self._close_peer(entry)
        with self._lock:
            self._closing = True
            self._wake_tx.send(b"")
        self._thread.join()
        for socket in (self._router, self._wake_rx, self._wake_tx):
            socket.close(0)
        self._ctx.term()
