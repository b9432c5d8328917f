"""A KVChannel in a child process, driven over a pipe: the multi-process harness of the transfer tests."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
from dualpath.kv import BlockBuffer, BlockLayout, get_geometry

# 2 layers x 16 tokens x 512 B/token/layer: 16 KiB Full Blocks, small enough to keep tests fast.
LAYOUT = BlockLayout(get_geometry("tiny"), 16)


def pattern(seed: int, slot: int) -> np.ndarray:
    """Distinct, reproducible bytes for one Full Block."""
    return np.random.default_rng([seed, slot]).integers(0, 256, LAYOUT.shape, dtype=np.uint8)


def _cut(address: str) -> int:
    """Shut down this process's TCP connections to ``address`` (a network fault; both ends stay up)."""
    port = int(address.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port:  # remote address:port, hex
                inodes.add(fields[9])
    cut = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                with socket.socket(fileno=os.dup(int(fd))) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                cut += 1
    return cut


def _serve(name: str, timeout_s: float, conn: Any) -> None:
    os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")
    from dualpath.transfer import KVChannel, TransferConfig, TransferFailed, grid_for_buffer

    channel = KVChannel(TransferConfig(name, timeout_s=timeout_s))
    buffers: dict[str, BlockBuffer] = {}
    flows: dict[str, Any] = {}

    def register(grid: str, capacity: int, seed: int | None) -> str:
        if grid in buffers:
            channel.deregister(grid)
        buffers[grid] = buffer = BlockBuffer(LAYOUT, capacity)
        for slot in range(capacity) if seed is not None else ():
            buffer.block(slot)[:] = pattern(seed, slot)
        channel.register(grid_for_buffer(grid, buffer))
        return channel.address

    def wait(key: str, method: str, *args: Any) -> str:
        try:
            getattr(flows[key], method)(*args)
            return "ok"
        except TransferFailed as exc:
            return f"failed: {exc.reason}"

    handlers = {
        "address": lambda: channel.address,
        "register": register,
        "connect": channel.connect,
        "peers": channel.peers,
        "expect": lambda rid, peer, grid, slots: flows.__setitem__(rid, channel.expect(rid, peer, grid, slots)),
        "open_send": lambda rid, *args: flows.__setitem__(rid, channel.open_send(rid, *args)),
        "send_layer": lambda rid, layer: flows[rid].send_layer(layer),
        "send_batch": lambda layer, rids: channel.send_layer(layer, [flows[rid] for rid in rids]),
        "wait_layer": lambda rid, layer, timeout=None: wait(rid, "wait_layer", layer, timeout),
        "wait_all": lambda rid, timeout=None: wait(rid, "wait_all", timeout),
        "wait_sent": lambda rid, timeout=None: wait(rid, "wait", timeout),
        "read": lambda grid, slot: buffers[grid].block(slot).copy(),
        "write": lambda grid, slot, data: buffers[grid].block(slot).__setitem__(..., data),
        "live": lambda: tuple(channel.live()),
        "cut": _cut,
    }
    while True:
        command, args = conn.recv()
        if command == "close":
            channel.close()
            conn.send(tuple(channel.agent.live()))
            return
        try:
            conn.send(("ok", handlers[command](*args)))
        except Exception as exc:  # reported to the test, which decides whether it was expected
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Engine:
    """Parent-side handle: ``engine.call("expect", ...)`` runs the command in the child and returns its result."""

    def __init__(self, name: str, timeout_s: float = 10.0) -> None:
        self.name = name
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(name, timeout_s, child), daemon=True)
        self.process.start()

    def call(self, command: str, *args: Any) -> Any:
        self._conn.send((command, args))
        if not self._conn.poll(60):
            raise TimeoutError(f"{self.name}: no answer to {command}")
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name}.{command}: {value}")
        return value

    def close(self) -> tuple[int, ...]:
        """Clean close in the child; returns the agent's live counts after it (all zero when clean)."""
        self._conn.send(("close", ()))
        live = self._conn.recv()
        self.process.join(30)
        return live

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)
