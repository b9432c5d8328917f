"""Control messages between transfer endpoints (msgpack over ZMQ); bytes themselves move through NIXL."""

from __future__ import annotations

import msgspec

from dualpath.transfer.grid import LayerBlockGrid


class Hello(msgspec.Struct, tag=True):
    """Who I am, how to reach me, my NIXL metadata and my grids. Sent on connect and re-registration.

    ``incarnation`` changes when a process restarts under the same name, which tells peers to drop
    everything they prepared against the old one.
    """

    name: str
    incarnation: str
    address: str
    metadata: bytes
    grids: list[LayerBlockGrid]
    reply: bool = False


class Expect(msgspec.Struct, tag=True):
    """Receiver -> sender: write request ``request_id`` into these slots of my grid ``grid``.

    ``meta`` is opaque to the channel: a receiver that drives the transfer names what it wants there.
    """

    request_id: str
    grid: str
    slots: list[int]
    meta: bytes = b""


class LayersDone(msgspec.Struct, array_like=True):
    """NIXL notification of one WRITE: every byte of ``layer`` of these requests is in place.

    It travels with the data through UCX (sent after the write is flushed), not over ZMQ.
    """

    request_ids: list[str]
    layer: int


class Abort(msgspec.Struct, tag=True):
    """Either side: request ``request_id`` failed here; release it and report it to your caller."""

    request_id: str
    reason: str


class Bye(msgspec.Struct, tag=True):
    """Clean shutdown: forget me now instead of waiting for a timeout."""

    incarnation: str


Message = Hello | Expect | Abort | Bye

encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Message)
layers_done_decoder = msgspec.msgpack.Decoder(LayersDone)
