"""Processes of the transfer benchmark: a PE and a DE channel, paced flows, and a two-flow sink."""

from __future__ import annotations

import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from dualpath.kv import BlockBuffer, BlockLayout, get_geometry

# The paper's 64-token blocks: 256 KiB Layer Blocks, 8 MiB Full Blocks; a request of 8 blocks is 64 MiB,
# 2 MiB per layer in 8 scattered Layer Blocks.
LAYOUT = BlockLayout(get_geometry("llama-3-8b"), 64)
BLOCKS, REQUESTS = 8, 4
GPU_H2D_CEILING_GBPS = 54.9  # pinned host -> H100 copy, reference/gpu-machine.md


def fill(slot: int) -> np.ndarray:
    return ((np.arange(LAYOUT.full_block_bytes, dtype=np.int64) * 31 + slot) % 251).astype(np.uint8)


def _memory(vram: bool, fill_it: bool) -> tuple[Any, Any]:
    """A grid over ``REQUESTS * BLOCKS`` slots: a host BlockBuffer, or a layer-major pool on the GPU."""
    from dualpath.transfer import grid_for_buffer, grid_for_layer_major

    slots = REQUESTS * BLOCKS
    if not vram:
        buffer = BlockBuffer(LAYOUT, slots)
        for slot in range(slots) if fill_it else ():
            buffer.block(slot)[:] = fill(slot).reshape(LAYOUT.shape)
        return grid_for_buffer("buf", buffer), buffer
    import torch

    pool = torch.zeros(LAYOUT.full_block_bytes * slots, dtype=torch.uint8, device="cuda")
    if fill_it:
        view = pool.view(LAYOUT.geometry.layers, slots, -1)
        for slot in range(slots):
            view[:, slot] = torch.from_numpy(fill(slot).reshape(LAYOUT.geometry.layers, -1)).cuda()
    return grid_for_layer_major("buf", pool, LAYOUT, slots), pool


def _contents(memory: Any, vram: bool, slot: int) -> np.ndarray:
    if not vram:
        return memory.block(slot).reshape(-1)
    view = memory.view(LAYOUT.geometry.layers, REQUESTS * BLOCKS, -1)
    return view[:, slot].cpu().numpy().reshape(-1)


def pair_role(role: str, vram: bool, conn: Connection) -> None:
    """PE (receiver) or DE (sender) of the layerwise and raw measurements, driven by the parent."""
    from dualpath.transfer import KVChannel, TransferConfig

    grid, memory = _memory(vram, fill_it=role == "de")  # GPU memory (and its context) before the agent
    channel = KVChannel(TransferConfig(role, timeout_s=60))
    channel.register(grid)
    conn.send(channel.address)
    with channel.receiving():  # the raw writes arrive outside any request
        _serve_pair(channel, memory, vram, conn)
    channel.close()


def _serve_pair(channel: Any, memory: Any, vram: bool, conn: Connection) -> None:
    grid = next(iter(channel.local_grids().values()))
    slots = [list(range(k * BLOCKS, (k + 1) * BLOCKS)) for k in range(REQUESTS)]
    inbound: list[Any] = []
    while (command := conn.recv())[0] != "stop":
        name, arg = command
        if name == "connect":
            channel.connect("pe", arg)
            conn.send("ok")
        elif name == "expect":
            inbound = [channel.expect(f"{arg}-{k}", "de", "buf", slots[k]) for k in range(REQUESTS)]
            conn.send("ok")
        elif name == "wait":
            for flow in inbound:
                flow.wait_all()
            exact = all(np.array_equal(_contents(memory, vram, s), fill(s)) for s in range(REQUESTS * BLOCKS))
            conn.send(exact)
        elif name == "send":
            flows = [channel.open_send(f"{arg}-{k}", "pe", "buf", slots[k]) for k in range(REQUESTS)]
            start = time.perf_counter()
            for layer in range(LAYOUT.geometry.layers):  # as a PE consumes them: layer by layer, all requests
                channel.send_layer(layer, flows)
            for flow in flows:
                flow.wait()
            conn.send(time.perf_counter() - start)
        elif name == "raw":
            conn.send((_raw_write(channel, grid, slots, contiguous=False), _raw_write(channel, grid, slots, True)))


def _raw_write(channel: Any, grid: Any, slots: list[list[int]], contiguous: bool) -> float:
    """The same bytes with plain NIXL, one WRITE per request (all layers at once): either the very same
    Layer Block descriptors, or one contiguous descriptor per request (the ceiling of this machine)."""
    remote = channel.peer_grids("pe")["buf"]
    request_bytes = BLOCKS * LAYOUT.full_block_bytes
    src_rows, dst_rows = grid.all_layer_blocks(), remote.all_layer_blocks()
    start = time.perf_counter()
    xfers = []
    for k in range(REQUESTS):
        if contiguous:
            src = np.array([[grid.base + k * request_bytes, request_bytes, grid.device]], dtype=np.uint64)
            dst = np.array([[remote.base + k * request_bytes, request_bytes, remote.device]], dtype=np.uint64)
        else:
            rows = np.concatenate([grid.layer_indices(np.array(slots[k]), layer) for layer in range(grid.layers)])
            src, dst = src_rows[rows], dst_rows[rows]
        xfers.append(channel.agent.post_descs("pe", src, grid.mem, dst, remote.mem)[0])
    while any(channel.agent.state(x) == "PROC" for x in xfers):
        pass  # the ceiling is measured with a hot poll; the channel itself never spins
    elapsed = time.perf_counter() - start
    assert all(channel.agent.state(x) == "DONE" for x in xfers)
    for xfer in xfers:
        channel.agent.release_xfer(xfer)
    return elapsed


def _run_pair(ctx: Any, rounds: int, src_vram: bool, dst_vram: bool) -> tuple[float, float, float]:
    conns, procs = {}, []
    for role, vram in (("pe", dst_vram), ("de", src_vram)):
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=pair_role, args=(role, vram, child), daemon=True))
        procs[-1].start()
        conns[role] = parent
    pe_address = conns["pe"].recv()
    conns["de"].recv()
    conns["de"].send(("connect", pe_address))
    conns["de"].recv()
    total = REQUESTS * BLOCKS * LAYOUT.full_block_bytes
    layerwise, raw, ceiling = [], [], []
    for r in range(rounds + 1):  # round 0 warms up connections and registrations
        conns["pe"].send(("expect", r))
        conns["pe"].recv()
        conns["de"].send(("send", r))
        elapsed = conns["de"].recv()
        conns["pe"].send(("wait", r))
        if not conns["pe"].recv():
            raise AssertionError("layerwise transfer delivered wrong bytes")
        conns["de"].send(("raw", r))
        raw_elapsed, contiguous_elapsed = conns["de"].recv()
        if r:
            print(f"  round {r}: layerwise {total / elapsed / 1e9:.2f}, raw {total / raw_elapsed / 1e9:.2f}, "
                  f"contiguous {total / contiguous_elapsed / 1e9:.2f} GB/s", flush=True)
            layerwise.append(total / elapsed / 1e9)
            raw.append(total / raw_elapsed / 1e9)
            ceiling.append(total / contiguous_elapsed / 1e9)
    for conn in conns.values():
        conn.send(("stop", None))
    for proc in procs:
        proc.join(60)
    return float(np.median(layerwise)), float(np.median(raw)), float(np.median(ceiling))


def layerwise_vs_raw(ctx: Any, rounds: int) -> tuple[float, float, float]:
    """GB/s of (layerwise channel, raw same descriptors, raw contiguous), DRAM -> DRAM, medians over
    ``rounds`` of REQUESTS concurrent requests."""
    return _run_pair(ctx, rounds, src_vram=False, dst_vram=False)


def vram_paths(ctx: Any) -> dict[str, float] | None:
    """Layerwise GB/s for DRAM->VRAM and VRAM->VRAM between two processes, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    results = {}
    for name, src_vram in (("layerwise DRAM->VRAM", False), ("layerwise VRAM->VRAM", True)):
        layerwise, raw, _ = _run_pair(ctx, 5, src_vram=src_vram, dst_vram=True)
        results[name] = layerwise
        results[name.replace("layerwise", "raw")] = raw
    return results


# -- priority limiter ----------------------------------------------------------------------------------
def sender_role(name: str, traffic: str, blocks: int, limiter_path: str, gbps: float, conn: Connection) -> None:
    """A flow of requests through one channel of class ``traffic``, paced to an offered rate or saturating."""
    from dualpath.transfer import KVChannel, LimiterConfig, TrafficClass, TransferConfig

    config = TransferConfig(name, traffic_class=TrafficClass(traffic), timeout_s=60,
                            limiter=LimiterConfig(Path(limiter_path), gbps=gbps))
    channel = KVChannel(config)
    grid, _buffer = _memory(vram=False, fill_it=True)  # the name keeps the registered memory alive
    channel.register(grid)
    channel.connect(f"sink-{name}", conn.recv())
    request_bytes = blocks * LAYOUT.full_block_bytes
    sent = 0
    while (command := conn.recv())[0] == "run":
        seconds, rate = command[1:]
        start, moved = time.perf_counter(), 0
        while (now := time.perf_counter()) - start < seconds:
            if rate and (due := start + moved / rate) > now:
                time.sleep(due - now)
            flow = channel.open_send(str(sent), f"sink-{name}", "buf", list(range(blocks)))
            flow.send_all()
            flow.wait()
            moved, sent = moved + request_bytes, sent + 1
        conn.send(moved / (time.perf_counter() - start) / 1e9)
    channel.close()


def sink_role(blocks: dict[str, int], conn: Connection) -> None:
    """Receives both flows, each through its own channel, keeping a few requests expected ahead."""
    from dualpath.transfer import KVChannel, TransferConfig, TransferFailed

    stop = threading.Event()
    channels, memory = {}, []
    for flow in blocks:
        channels[flow] = channel = KVChannel(TransferConfig(f"sink-{flow}", timeout_s=600))
        grid, buffer = _memory(vram=False, fill_it=False)
        memory.append(buffer)  # registered memory must outlive its registration
        channel.register(grid)
    conn.send({flow: channel.address for flow, channel in channels.items()})

    def serve(flow: str) -> None:
        channel, pending, next_id = channels[flow], deque(), 0
        while not stop.is_set():
            while len(pending) < 3 and flow in channel.peers():
                pending.append(channel.expect(str(next_id), flow, "buf", list(range(blocks[flow]))))
                next_id += 1
            if not pending:
                stop.wait(0.01)  # the sender has not connected yet
                continue
            try:
                pending[0].wait_all(timeout=0.2)
                pending.popleft()
            except TimeoutError:
                continue
            except TransferFailed:  # the sender closed; its remaining expectations are void
                pending.popleft()

    threads = [threading.Thread(target=serve, args=(flow,)) for flow in blocks]
    for thread in threads:
        thread.start()
    conn.recv()
    stop.set()
    for thread in threads:
        thread.join()
    for channel in channels.values():
        channel.close()


def limiter_flows(ctx: Any, path: Path, gbps: float, model_share: float, seconds: float) -> dict[str, float]:
    """Model flow alone, KV flow alone, then both at once, all through one node's limiter."""
    blocks = {"model": 4, "kv": BLOCKS}
    sink_conn, child = ctx.Pipe()
    procs = [ctx.Process(target=sink_role, args=(blocks, child), daemon=True)]
    senders = {}
    for flow, traffic in (("model", "model"), ("kv", "kv")):
        parent, child = ctx.Pipe()
        senders[flow] = parent
        procs.append(ctx.Process(target=sender_role, args=(flow, traffic, blocks[flow], str(path), gbps, child),
                                 daemon=True))
    for proc in procs:
        proc.start()
    addresses = sink_conn.recv()
    for flow, conn in senders.items():
        conn.send(addresses[flow])
    model_rate = model_share * gbps * 1e9 / 8

    def run(flows: dict[str, float | None]) -> dict[str, float]:
        for flow, rate in flows.items():
            senders[flow].send(("run", seconds, rate))
        return {flow: senders[flow].recv() for flow in flows}

    run({"model": model_rate, "kv": None})  # warm-up: connections, registrations, page faults
    results = {
        "model alone": run({"model": model_rate})["model"],
        "KV alone": run({"kv": None})["kv"],
    }
    both = run({"model": model_rate, "kv": None})
    results["model with KV saturating"], results["KV with model"] = both["model"], both["kv"]
    for conn in senders.values():
        conn.send(("stop",))
    sink_conn.send("stop")
    for proc in procs:
        proc.join(60)
    return results
