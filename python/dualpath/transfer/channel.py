"""KVChannel: one engine's transfer endpoint — layerwise KV writes to and from its peers.

The receiver of a request (the PE for the DE->PE hit KV, the DE for the PE->DE return) calls
:meth:`KVChannel.expect` with the slots it allocated; the sender calls :meth:`KVChannel.open_send` with
the slots holding the KV and posts layers as they are ready. The sender writes with NIXL (one-sided
WRITE); the NIXL notification carried by each write tells the receiver which layers landed, which wakes
whoever waits for them. Every failure — dead, stalled or restarted peer, NIXL error, timeout — fails
the request on both sides and releases its handles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from dualpath.transfer.agent import Live
from dualpath.transfer.config import TransferConfig
from dualpath.transfer.endpoint import Endpoint
from dualpath.transfer.flows import Inbound, Outbound, TransferFailed
from dualpath.transfer.messages import Abort, Expect, LayersDone, Message, encoder, layers_done_decoder
from dualpath.transfer.plans import make_plan


class ChannelLive(NamedTuple):
    agent: Live
    peers: int
    inbound: int
    outbound: int
    expects: int
    in_flight: int


class KVChannel(Endpoint):
    """A NIXL agent, its registered grids, its peers and the requests moving between them."""

    def __init__(self, config: TransferConfig, on_expect: Callable[[str, Expect], None] | None = None) -> None:
        # Called on the control thread for every Expect, so that a sender can serve requests it did not
        # know about (the DE read path: the PE asks for blocks by key); it must hand work off, not block.
        self._on_expect = on_expect
        self._expects: dict[tuple[str, str], Expect] = {}
        self._inbound: dict[tuple[str, str], Inbound] = {}
        self._outbound: dict[tuple[str, str], Outbound] = {}
        super().__init__(config)

    def _take_requests(self, peer: str) -> tuple[list[Inbound], list[Outbound]]:
        inbound = [self._inbound.pop(k) for k in [k for k in self._inbound if k[0] == peer]]
        outbound = [self._outbound.pop(k) for k in [k for k in self._outbound if k[0] == peer]]
        for key in [k for k in self._expects if k[0] == peer]:
            del self._expects[key]
        return inbound, outbound

    def _cancel_transfers(self, requests: tuple[list[Inbound], list[Outbound]]) -> None:
        for out in requests[1]:
            self._poller.cancel(out.detach())

    def _fail_requests(self, requests: tuple[list[Inbound], list[Outbound]], reason: str) -> None:
        inbound, outbound = requests
        for flow in inbound:
            self._poller.release()
            flow.fail(reason)
        for out in outbound:
            out.fail(reason)

    # -- receiving --------------------------------------------------------------------------------------
    def expect(self, request_id: str, peer: str, grid: str, slots: np.ndarray | list[int],
               meta: bytes = b"") -> Inbound:
        """Ask ``peer`` to write ``request_id`` into ``slots`` of local ``grid``; wait on the result per layer.

        ``meta`` travels with the request to the peer's ``on_expect`` callback.
        """
        target = self._grid(grid)
        slots = target.check_slots(np.asarray(slots))
        key = (peer, request_id)
        with self._cond:
            if peer not in self._peers:
                raise TransferFailed(request_id, f"{peer!r} is not connected")
            if key in self._inbound:
                raise ValueError(f"request {request_id!r} from {peer!r} is already expected")
            flow = Inbound(request_id, peer, target.layers, self.config.timeout_s, self._stalled)
            self._inbound[key] = flow
            self._poller.hold()  # released when the flow leaves the table
        if not self._control.send(peer, Expect(request_id, grid, slots.tolist(), meta)):
            self._drop_inbound(flow, "could not reach peer")
            raise TransferFailed(request_id, f"{peer!r} is not reachable")
        return flow

    def _stalled(self, flow: Inbound, reason: str) -> None:
        self._drop_inbound(flow, reason)
        self._control.send(flow.peer, Abort(flow.request_id, reason))

    def _drop_inbound(self, flow: Inbound, reason: str) -> None:
        with self._cond:
            present = self._inbound.get((flow.peer, flow.request_id)) is flow
            if present:
                del self._inbound[(flow.peer, flow.request_id)]
        if present:
            self._poller.release()
        flow.fail(reason)

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Keep this side progressing for writes that arrive outside any request (raw transfers)."""
        self._poller.hold()
        try:
            yield
        finally:
            self._poller.release()

    # -- sending -------------------------------------------------------------------------------------------
    def open_send(self, request_id: str, peer: str, grid: str, slots: np.ndarray | list[int],
                  token_start: int = 0, token_end: int | None = None, timeout: float | None = None) -> Outbound:
        """Start sending tokens ``[token_start, token_end)`` of a request whose block i is in ``slots[i]``.

        Waits for the receiver's :meth:`expect` (up to ``timeout``, default ``config.timeout_s``). Whole
        blocks use descriptor lists prepared at registration; partial ranges merge contiguous runs.
        """
        src = self._grid(grid)
        src_slots = src.check_slots(np.asarray(slots))
        end = src_slots.size * src.block_tokens if token_end is None else token_end
        if not 0 <= token_start < end <= src_slots.size * src.block_tokens:
            raise ValueError(f"token range [{token_start}, {end}) does not fit {src_slots.size} blocks")
        key = (peer, request_id)
        with self._cond:
            self._cond.wait_for(
                lambda: key in self._expects or (peer not in self._peers and peer not in self._refreshing),
                timeout or self.config.timeout_s,
            )
            expect, state = self._expects.pop(key, None), self._peers.get(peer)
        if state is None or expect is None:
            why = "is not connected" if state is None else "sent no Expect in time"
            raise TransferFailed(request_id, f"{peer!r} {why}")
        try:
            dst = state.grids.get(expect.grid)
            if dst is None:
                raise ValueError(f"{peer!r} has no grid {expect.grid!r}")
            plan = make_plan(peer, src, src_slots, self._local_dlists[src.name], dst,
                             dst.check_slots(np.asarray(expect.slots)), state.dlists[dst.name], token_start, end)
        except ValueError as exc:
            self._control.send(peer, Abort(request_id, str(exc)))
            raise
        flow = Outbound(request_id, peer, src.layers, plan, self.send_layer)
        with self._cond:
            self._outbound[key] = flow
        return flow

    def send_layer(self, layer: int, flows: list[Outbound]) -> None:
        """Post ``layer`` of several requests to one peer, as one transfer per kind of plan.

        Returns once posted; the receiver learns of each layer when its bytes are in place.
        """
        if len({flow.peer for flow in flows}) != 1:
            raise ValueError("send_layer takes a non-empty list of requests to one peer")
        for flow in flows:
            flow.check_sendable(layer)
        for flow in flows:
            flow.claim(layer)
        if self.limiter is not None:
            self.limiter.acquire(sum(flow.plan.layer_bytes(layer) for flow in flows), self.agent.traffic_class)
        groups: dict[object, list[Outbound]] = {}
        for flow in flows:
            groups.setdefault(flow.plan.key, []).append(flow)
        for group in groups.values():
            self._post_group(layer, group)

    def _post_group(self, layer: int, group: list[Outbound]) -> None:
        notif = encoder.encode(LayersDone([flow.request_id for flow in group], layer))
        try:
            xfer, done = group[0].plan.post(self.agent, [flow.plan.parts(layer) for flow in group], notif)
        except Exception as exc:
            for flow in group:
                self._fail_outbound(flow, f"posting layer {layer} failed: {exc}")
            raise TransferFailed(group[0].request_id, str(exc)) from exc
        live = [flow for flow in group if flow.track(xfer)]
        if done or not live:  # completed inside the post (shared-memory copies often do), or moot
            self.agent.release_xfer(xfer)
            self._layer_written(live, layer, xfer)
            return
        self._poller.watch(xfer, self.config.timeout_s, lambda: self._layer_written(live, layer, xfer),
                           lambda reason: self._layer_failed(live, layer, reason))

    def _layer_written(self, flows: list[Outbound], layer: int, xfer: Any) -> None:
        for flow in flows:
            if flow.landed(layer, xfer):
                with self._cond:
                    if self._outbound.get((flow.peer, flow.request_id)) is flow:
                        del self._outbound[(flow.peer, flow.request_id)]

    def _layer_failed(self, flows: list[Outbound], layer: int, reason: str) -> None:
        for flow in flows:
            self._fail_outbound(flow, f"layer {layer}: {reason}")

    def _fail_outbound(self, flow: Outbound, reason: str, tell_peer: bool = True) -> None:
        with self._cond:
            first = self._outbound.get((flow.peer, flow.request_id)) is flow
            if first:
                del self._outbound[(flow.peer, flow.request_id)]
        self._poller.cancel(flow.detach())
        flow.fail(reason)
        if first and tell_peer:
            self._control.send(flow.peer, Abort(flow.request_id, reason))

    def abort(self, request_id: str, peer: str, reason: str = "aborted by caller") -> None:
        """Give up on a request in either direction (the caller fell back); the peer is told."""
        self._on_abort(peer, Abort(request_id, reason))
        self._control.send(peer, Abort(request_id, reason))

    # -- control messages -------------------------------------------------------------------------------
    def _on_notifs(self, arrived: dict[str, list[bytes]]) -> None:
        for sender, notes in arrived.items():
            peer = sender.decode() if isinstance(sender, bytes) else sender
            for note in notes:
                done = layers_done_decoder.decode(note)
                for request_id in done.request_ids:
                    with self._cond:
                        flow = self._inbound.get((peer, request_id))
                    if flow is not None and 0 <= done.layer < flow.layers and flow.landed(done.layer):
                        self._drop_inbound(flow, "complete")

    def _on_request_message(self, peer: str, message: Message) -> None:
        if isinstance(message, Expect):
            with self._cond:
                self._expects[(peer, message.request_id)] = message
                self._cond.notify_all()
            if self._on_expect is not None:
                self._on_expect(peer, message)
        elif isinstance(message, Abort):
            self._on_abort(peer, message)

    def _on_abort(self, peer: str, abort: Abort) -> None:
        key = (peer, abort.request_id)
        with self._cond:
            inbound, outbound = self._inbound.get(key), self._outbound.get(key)
            self._expects.pop(key, None)
        if inbound is not None:
            self._drop_inbound(inbound, f"aborted: {abort.reason}")
        if outbound is not None:
            self._fail_outbound(outbound, f"aborted: {abort.reason}", tell_peer=False)

    def live(self) -> ChannelLive:
        with self._cond:
            counts = len(self._peers), len(self._inbound), len(self._outbound), len(self._expects)
        return ChannelLive(self.agent.live(), *counts, self._poller.in_flight())

    def close(self) -> None:
        """Say goodbye, fail what is left, then release every handle, peer and registration."""
        self._close_endpoint()
