"""Multi-process KVChannel tests on loopback: real NIXL (UCX) DRAM->DRAM writes between spawned processes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

pytest.importorskip("nixl")

from dualpath.transfer.control import ControlPlane
from transfer_engine import LAYOUT, Engine, pattern

LAYERS = LAYOUT.geometry.layers
TOKENS = LAYOUT.block_tokens
BYTES = LAYOUT.geometry.bytes_per_token_per_layer


def start_pair(timeout_s: float = 10.0) -> tuple[Engine, Engine]:
    """A PE and a DE, each with a grid, connected to each other. The DE's grid holds pattern(1, slot)."""
    pe, de = Engine("pe", timeout_s), Engine("de", timeout_s)
    pe.call("register", "pe_buf", 12, None)
    de_address = de.call("register", "de_buf", 12, 1)
    pe.call("connect", "de", de_address)
    assert de.call("peers") == ["pe"] and pe.call("peers") == ["de"]
    return pe, de


@pytest.fixture
def pair() -> Iterator[tuple[Engine, Engine]]:
    pe, de = start_pair()
    yield pe, de
    for engine in (pe, de):
        engine.kill()


def clean(live: tuple) -> bool:
    """No request, transfer handle or pending expectation left (grids, peers and prepared lists remain)."""
    agent, _, inbound, outbound, expects, in_flight = live
    return agent[2] == 0 and (inbound, outbound, expects, in_flight) == (0, 0, 0, 0)


def test_layerwise_several_requests_at_once_byte_exact(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    # Three requests, interleaved layer by layer, scattered into non-contiguous PE slots.
    requests = {"a": ([0, 1, 2], [7, 3, 5]), "b": ([3, 4], [0, 11]), "c": ([5, 6, 7, 8], [1, 2, 9, 10])}
    for rid, (_, pe_slots) in requests.items():
        pe.call("expect", rid, "de", "pe_buf", pe_slots)
    for rid, (de_slots, _) in requests.items():
        de.call("open_send", rid, "pe", "de_buf", de_slots)
    de.call("send_batch", 0, list(requests))  # layer 0 of all three as one transfer
    for rid in requests:
        assert pe.call("wait_layer", rid, 0) == "ok"
    for rid in requests:  # then one transfer per request
        de.call("send_layer", rid, 1)
    for rid in requests:
        assert pe.call("wait_layer", rid, 1) == "ok"
    for rid, (de_slots, pe_slots) in requests.items():
        assert de.call("wait_sent", rid) == "ok"
        for de_slot, pe_slot in zip(de_slots, pe_slots, strict=True):
            assert np.array_equal(pe.call("read", "pe_buf", pe_slot), pattern(1, de_slot))
    assert np.array_equal(pe.call("read", "pe_buf", 4), np.zeros(LAYOUT.shape, np.uint8))  # untouched slot
    assert clean(pe.call("live")) and clean(de.call("live"))
    with pytest.raises(RuntimeError, match="already sent"):
        de.call("send_layer", "a", 0)


def test_wait_layer_returns_per_layer_before_the_rest_is_sent(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    pe.call("expect", "r", "de", "pe_buf", [0, 1])
    de.call("open_send", "r", "pe", "de_buf", [2, 3])
    de.call("send_layer", "r", 1)  # layers may go in any order; only layer 1 has landed
    assert pe.call("wait_layer", "r", 1) == "ok"
    layer1 = pe.call("read", "pe_buf", 0)
    assert np.array_equal(layer1[1], pattern(1, 2)[1]) and not layer1[0].any()
    de.call("send_layer", "r", 0)
    assert pe.call("wait_all", "r") == "ok"


@pytest.mark.parametrize("hit_tokens", [2 * TOKENS, 2 * TOKENS - 5])
def test_new_token_return_merges_next_to_kept_hit_kv(pair: tuple[Engine, Engine], hit_tokens: int) -> None:
    pe, de = pair
    total = 3 * TOKENS + 7  # the last block is partial
    de_slots, pe_slots = [4, 9, 1, 6], [2, 8, 5, 0]
    for slot in pe_slots:  # the PE's copy of the request: hit KV plus the new tokens it computed
        pe.call("write", "pe_buf", slot, pattern(2, slot))
    kept = {slot: de.call("read", "de_buf", slot) for slot in de_slots}
    de.call("expect", "ret", "pe", "de_buf", de_slots)
    pe.call("open_send", "ret", "de", "pe_buf", pe_slots, hit_tokens, total)
    for layer in range(LAYERS):
        pe.call("send_layer", "ret", layer)
        assert de.call("wait_layer", "ret", layer) == "ok"
    for block, (de_slot, pe_slot) in enumerate(zip(de_slots, pe_slots, strict=True)):
        got, hit, new = de.call("read", "de_buf", de_slot), kept[de_slot], pattern(2, pe_slot)
        tokens = np.arange(block * TOKENS, (block + 1) * TOKENS)
        is_new = (tokens >= hit_tokens) & (tokens < total)
        assert np.array_equal(got[:, is_new], new[:, is_new])
        assert np.array_equal(got[:, ~is_new], hit[:, ~is_new])  # hit KV and bytes past the end untouched


def test_full_kv_return_for_the_pe_read_path(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    total = 2 * TOKENS + 3
    for slot in (3, 4, 5):
        pe.call("write", "pe_buf", slot, pattern(3, slot))
    de.call("expect", "full", "pe", "de_buf", [10, 11, 0])
    pe.call("open_send", "full", "de", "pe_buf", [3, 4, 5], 0, total)
    for layer in range(LAYERS):
        pe.call("send_layer", "full", layer)
    assert de.call("wait_all", "full") == "ok"
    assert np.array_equal(de.call("read", "de_buf", 10), pattern(3, 3))
    assert np.array_equal(de.call("read", "de_buf", 11), pattern(3, 4))
    last = de.call("read", "de_buf", 0)
    assert np.array_equal(last[:, :3], pattern(3, 5)[:, :3]) and np.array_equal(last[:, 3:], pattern(1, 0)[:, 3:])


def test_mismatched_expectation_fails_both_sides(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    pe.call("expect", "m", "de", "pe_buf", [0, 1, 2])
    with pytest.raises(RuntimeError, match="expects 3 blocks"):
        de.call("open_send", "m", "pe", "de_buf", [0, 1])
    assert pe.call("wait_all", "m").startswith("failed: aborted")
    assert clean(pe.call("live")) and clean(de.call("live"))


def test_sender_times_out_without_expectation() -> None:
    pe, de = start_pair(timeout_s=0.5)
    try:
        with pytest.raises(RuntimeError, match=r"TransferFailed.*sent no Expect in time"):
            de.call("open_send", "nobody", "pe", "de_buf", [0])
    finally:
        pe.kill()
        de.kill()


def test_sender_death_mid_request_fails_receiver_and_releases_everything(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    pe.call("expect", "d", "de", "pe_buf", [0, 1, 2])
    de.call("open_send", "d", "pe", "de_buf", [0, 1, 2])
    de.call("send_layer", "d", 0)
    assert pe.call("wait_layer", "d", 0) == "ok"
    de.kill()
    assert pe.call("wait_layer", "d", 1) == "failed: 'de': connection lost"
    assert pe.call("peers") == []
    agent, *rest = pe.call("live")
    assert agent == (1, 1, 0, 0) and rest == [0, 0, 0, 0, 0]  # only its own grid and prepared list


def test_receiver_death_fails_sender_and_releases_everything(pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    pe.call("expect", "d", "de", "pe_buf", [0, 1])
    de.call("open_send", "d", "pe", "de_buf", [0, 1])
    pe.kill()
    assert de.call("wait_sent", "d").startswith("failed: 'pe': connection lost")
    with pytest.raises(RuntimeError, match="TransferFailed"):
        de.call("send_layer", "d", 0)
    agent, *rest = de.call("live")
    assert agent == (1, 1, 0, 0) and rest == [0, 0, 0, 0, 0]


def test_a_dropped_connection_between_live_peers_fails_both_sides_at_once_and_heals(
        pair: tuple[Engine, Engine]) -> None:
    pe, de = pair
    pe.call("expect", "d", "de", "pe_buf", [0, 1])
    de.call("open_send", "d", "pe", "de_buf", [0, 1])
    de.call("send_layer", "d", 0)
    assert pe.call("wait_layer", "d", 0) == "ok"
    assert pe.call("cut", de.call("address")) == 1  # the PE's connection to the DE drops; both stay up
    assert pe.call("wait_layer", "d", 1) == "failed: 'de': connection lost"
    # The PE dials again and greets the DE, which fails its side at once rather than at a timeout.
    assert de.call("wait_sent", "d", 5.0) == "failed: 'pe': peer lost its connection to us"
    deadline = time.monotonic() + 10.0
    while (pe.call("peers"), de.call("peers")) != (["de"], ["pe"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    pe.call("expect", "again", "de", "pe_buf", [5])
    de.call("open_send", "again", "pe", "de_buf", [7])
    for layer in range(LAYERS):
        de.call("send_layer", "again", layer)
    assert pe.call("wait_all", "again") == "ok" and de.call("wait_sent", "again") == "ok"
    assert np.array_equal(pe.call("read", "pe_buf", 5), pattern(1, 7))
    assert clean(pe.call("live")) and clean(de.call("live"))


def test_long_timeouts_keep_heartbeats_within_what_libzmq_carries() -> None:
    # A heartbeat TTL of 65.6 s or more wraps around in libzmq (zeromq/libzmq#4226): with the 215 s timeout
    # of a slow emulated NIC, live idle connections dropped 18.4 s after every PING.
    lost: list[str] = []
    planes = [ControlPlane(name, "127.0.0.1", 0, 215.0, lambda peer, message: None, lost.append)
              for name in ("a", "b")]
    try:
        planes[0].connect("b", planes[1].address)
        ttl = planes[0]._peers["b"].socket.getsockopt(zmq.HEARTBEAT_TTL)
        assert 0 < ttl < 65_600 and planes[0]._peers["b"].socket.getsockopt(zmq.HEARTBEAT_TIMEOUT) == ttl
    finally:
        for plane in planes:
            plane.close()
    assert lost == []


def test_stalled_sender_is_detected_within_timeout() -> None:
    pe, de = start_pair(timeout_s=1.0)
    try:
        pe.call("expect", "s", "de", "pe_buf", [0, 1])
        de.call("open_send", "s", "pe", "de_buf", [0, 1])
        de.call("send_layer", "s", 0)
        assert pe.call("wait_layer", "s", 0) == "ok"
        de.pause()  # alive but silent: heartbeats or the stall timeout catch it, whichever fires first
        result = pe.call("wait_layer", "s", 1, 30.0)
        assert result in ("failed: 'de': connection lost", "failed: no layer from 'de' for 1.0 s")
        assert clean(pe.call("live"))
    finally:
        de.resume()
        de.kill()
        pe.kill()


def test_restarted_peer_and_re_registration() -> None:
    pe, de = start_pair()
    try:
        de.kill()
        de = Engine("de")  # same name, new process: a new incarnation
        address = de.call("register", "de_buf", 12, 4)
        de.call("connect", "pe", pe.call("address"))
        pe.call("expect", "r2", "de", "pe_buf", [6])
        de.call("open_send", "r2", "pe", "de_buf", [2])
        de.call("send_layer", "r2", 0)
        de.call("send_layer", "r2", 1)
        assert pe.call("wait_all", "r2") == "ok"
        assert np.array_equal(pe.call("read", "pe_buf", 6), pattern(4, 2))
        # The PE replaces its buffer (new memory, new registration); the DE learns it from the new Hello.
        pe.call("register", "pe_buf", 4, None)
        pe.call("register", "extra", 2, None)
        for rid, grid, slot in (("r3", "pe_buf", 3), ("r4", "extra", 1)):
            pe.call("expect", rid, "de", grid, [slot])
            de.call("open_send", rid, "pe", "de_buf", [5])
            for layer in range(LAYERS):
                de.call("send_layer", rid, layer)
            assert pe.call("wait_all", rid) == "ok"
            assert np.array_equal(pe.call("read", grid, slot), pattern(4, 5))
        assert address == de.call("address")
        assert pe.close() == (0, 0, 0, 0)
        assert de.close() == (0, 0, 0, 0)
    finally:
        pe.kill()
        de.kill()
