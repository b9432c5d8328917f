"""A local PD cluster: P prefill and D decode real SGLang servers, and a router.

Each server is its own "node" with its own emulated storage-NIC cap over one shared store directory,
which is what makes the prefill-side read bottleneck (and DualPath's relief of it) visible on one host.
The servers run DualPath (the plugin), or stock SGLang with the block store as a plain HiCache backend
(the stock stack), or either set in turn for an A/B: the stock set's servers are the same nodes, so both
read through the same NIC caps. Routers run as subprocesses, up to two side by side (one per mode, for an
A/B that takes turns); servers stay up while routers come and go.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dualpath.cluster.servers import (
    KV_PORT_OFFSET,
    NCCL_PORT_OFFSET,
    TINY_MODEL,
    Server,
    ServerOptions,
    ServerSpec,
    flush_cache,
    has_tokenizer,
    healthy,
    start_servers,
    stop_servers,
)
from dualpath.kv import block_keys
from dualpath.router.config import PrefillSpec, RouterConfig, to_argv
from dualpath.srt.stock_router import launch_command
from dualpath.store import NodeReader, StoreIndex, drop_all_blocks, node_dir

log = logging.getLogger(__name__)

ROUTERS = 2  # an A/B runs its two modes' routers side by side
STOCK_ROUTER = "stock-router"  # sglang-router 0.3.2's own over DualPath's servers, as a mode of route()
STOCK = "stock"  # the stock stack: sglang-router 0.3.2 over stock servers with the block store as HiCache backend
Servers = Literal["dualpath", "stock", "both"]
STOCK_PORT_OFFSET = 100  # the stock set's ports: the DualPath set's + 100

PAGE_TOKENS = 64  # the servers' page size (dualpath.launch_server's default)
MIN_KV_TOKENS = 1024
HOST_RATIO = 1.1  # host pool / device pool with kv_tokens: SGLang's HiCache wants the host pool the larger
# A killed server's connections linger in the kernel (FIN_WAIT2 until its peers close, TIME_WAIT after), up to
# tcp_fin_timeout (60 s) each; a listener that did not set SO_REUSEADDR leaves them blocking its port.
PORT_RELEASE_S = 75.0
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


@dataclass(frozen=True)
class ClusterConfig:
    work_dir: Path
    prefill: int = 1
    decode: int = 1
    nic_gbps: float = 0.16
    base_port: int = 32000
    model: Path = TINY_MODEL
    cpu: bool = True
    max_total_tokens: int = 160_000
    staging_blocks: int = 1024
    # How long a PE waits for a DE's pages before reading them itself; None: room for the DE to read
    # 64 MiB through its (emulated, often tiny) NIC twice over, and never under 20 s.
    transfer_timeout_s: float | None = None
    # The router's scheduler thresholds: alpha = 3 s of one node's reads, beta = 5 s of one engine's prefill.
    bytes_per_token: int = 2 * 2 * 2 * 64 * 4  # the tiny Llama: 2 layers x K,V x 2 heads x 64 dims x fp32
    prefill_tokens_per_s: float = 20_000.0
    server_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    servers: Servers = "dualpath"
    # A prefill's KV memory in tokens (its device pool; its HiCache host pool HOST_RATIO x that), and every server's
    # storage slots (as many tokens). None: max_total_tokens and staging_blocks, room for every agent of an A/B.
    # Decodes keep max_total_tokens: stock SGLang's decode reuses no prefix, and each request reserves room there.
    kv_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.prefill < 1 or self.decode < 1:
            raise ValueError(f"a cluster needs >= 1 prefill and >= 1 decode server, got {self.prefill}P{self.decode}D")
        if self.nic_gbps <= 0:
            raise ValueError(f"nic_gbps must be positive, got {self.nic_gbps}")
        if self.kv_tokens is not None and self.kv_tokens < MIN_KV_TOKENS:
            raise ValueError(f"kv_tokens must be >= {MIN_KV_TOKENS} (a prefill's pool holds whole prompts), "
                             f"got {self.kv_tokens}")
        ports = _ports(self)
        if len(set(ports)) != len(ports):  # prefill i listens on base + 10 i, decode i on base + 50 + 10 i
            raise ValueError(f"{self.prefill}P{self.decode}D: two servers would share a port; at most 5 prefill "
                             "servers fit the port layout")
        low, high = _ephemeral_ports()
        if any(low <= port <= high for port in ports):
            # An outgoing connection (the router probing its engines, SGLang's own clients) may take any port
            # of that range first, and the server bound there later fails with EADDRINUSE.
            raise ValueError(f"ports {min(ports)}-{max(ports)} overlap the kernel's ephemeral port range "
                             f"{low}-{high}; pick a base port below {low - (max(ports) - self.base_port)} "
                             f"or above {high}")

    @property
    def timeout_s(self) -> float:
        if self.transfer_timeout_s is not None:
            return self.transfer_timeout_s
        return max(20.0, 2 * (64 << 20) / (self.nic_gbps * 1e9 / 8))

    @property
    def store_root(self) -> Path:
        return self.work_dir / "store"

    @property
    def router_ports(self) -> tuple[int, ...]:
        return tuple(self.base_port + 99 - i for i in range(ROUTERS))

    @property
    def metrics_ports(self) -> tuple[int, ...]:
        """The stock routers' Prometheus ports (it always serves metrics apart), one per router port."""
        return tuple(self.base_port + 97 - i for i in range(ROUTERS))

    def specs(self) -> list[ServerSpec]:
        """Every server the cluster may run: the DualPath set, the stock set (ports + :data:`STOCK_PORT_OFFSET`),
        or both (one set at a time, :meth:`LocalCluster.serve`)."""
        sets = {"dualpath": (True,), "stock": (False,), "both": (True, False)}[self.servers]
        return [spec for dualpath in sets for spec in self._set(dualpath)]

    def stack(self, mode: str) -> list[ServerSpec]:
        """The servers a router of ``mode`` fronts: the stock set for :data:`STOCK`, else the DualPath set."""
        return self._set(mode != STOCK)

    def _set(self, dualpath: bool) -> list[ServerSpec]:
        pe_cpus, de_cpus = self.cpu_shares()
        base = self.base_port + (0 if dualpath else STOCK_PORT_OFFSET)
        memory = () if self.kv_tokens is None else ("--max-total-tokens", str(self.kv_tokens),
                                                     "--hicache-ratio", str(HOST_RATIO))
        prefill = [ServerSpec("prefill", base + 10 * i, f"pe{i}", bootstrap_port=base + 10 * i + 1,
                              nic_gbps=self.nic_gbps, dualpath=dualpath, block_store=not dualpath, cpus=pe_cpus[i],
                              extra_args=memory)
                   for i in range(self.prefill)]
        decode = [ServerSpec("decode", base + 50 + 10 * i, f"de{i}", nic_gbps=self.nic_gbps, dualpath=dualpath,
                             block_store=not dualpath, cpus=de_cpus[i]) for i in range(self.decode)]
        return prefill + decode

    @property
    def nodes(self) -> list[str]:
        return [spec.node for spec in self._set(True)]

    def cpu_shares(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """On CPU, the cores of each prefill and each decode server: prefills and decodes get disjoint
        shares (in proportion to their numbers), as they would get GPUs of their own, so that a prefill's
        compute never slows a decode's steps; servers of one role split their share. Empty on GPUs, or
        with a single core."""
        cores = sorted(os.sched_getaffinity(0))
        if not self.cpu or len(cores) < 2:
            return [()] * self.prefill, [()] * self.decode
        cut = min(max(1, len(cores) * self.prefill // (self.prefill + self.decode)), len(cores) - 1)

        def split(share: list[int], servers: int) -> list[tuple[int, ...]]:
            return [tuple(share[i::servers]) or (share[i % len(share)],) for i in range(servers)]

        return split(cores[:cut], self.prefill), split(cores[cut:], self.decode)


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not block servers
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(config: ClusterConfig) -> list[int]:
    return [p for s in config.specs()
            for p in (s.port, s.bootstrap_port, s.port + NCCL_PORT_OFFSET, s.port + KV_PORT_OFFSET)
            if p is not None] + list(config.router_ports) + list(config.metrics_ports)


def busy_ports(config: ClusterConfig) -> dict[int, list[str]]:
    """The cluster's ports that a server cannot bind now, each with the TCP states of the sockets on it."""
    busy = [p for p in _ports(config) if not _port_free(p)]
    if not busy:
        return {}
    states: dict[int, list[str]] = {p: [] for p in busy}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in (line.split() for line in lines):
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in states:
                states[port].append(TCP_STATES.get(fields[3], fields[3]))
    return states


class LocalCluster:
    """Start with :meth:`start`, pick a router mode with :meth:`route`, always :meth:`stop` (context manager)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.servers: list[Server] = []
        self.routers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}  # mode -> (process, port)
        self._nodes: list[NodeReader] = []

    def start(self, timeout_s: float = 600.0) -> None:
        """Start the servers: the configured set (``both``: the stock set, as an A/B starts with the stock
        baseline's rounds; :meth:`serve` swaps them)."""
        busy = busy_ports(self.config)
        if busy:
            raise RuntimeError(f"ports in use: {busy} (another cluster running? pick --base-port)")
        self.config.store_root.mkdir(parents=True, exist_ok=True)
        self._start(self.config.stack("dualpath" if self.config.servers == "dualpath" else STOCK), timeout_s)

    def _start(self, specs: list[ServerSpec], timeout_s: float) -> None:
        c = self.config
        # Idle servers sleep (stock --sleep-on-idle): between rounds they leave the cores to the routers and client.
        slots = c.staging_blocks if c.kv_tokens is None else c.kv_tokens // PAGE_TOKENS
        options = ServerOptions(c.store_root, c.work_dir / "logs", c.model, c.cpu, c.max_total_tokens, c.timeout_s,
                                slots, ("--sleep-on-idle", *c.server_args), dict(c.env))
        self.servers = start_servers(specs, options, timeout_s)

    def serving(self, mode: str) -> bool:
        """Whether the servers a router of ``mode`` fronts are the ones running."""
        return {s.port for s in self.config.stack(mode)} == {s.spec.port for s in self.servers}

    def serve(self, mode: str, timeout_s: float = 600.0) -> str:
        """The URL of ``mode``'s router, serving: its set of servers started in place of the other (one set at a
        time: two need more memory than a 24 GB machine has, as SGLang's HiCache keeps 10 GiB of it free), and the
        router started unless it runs. A swap happens between rounds, whose caches start empty anyway."""
        if not self.serving(mode):
            self.stop()
            self._start(self.config.stack(mode), timeout_s)
        router = self.routers.get(mode)
        if router is not None and router[0].poll() is None:
            return f"http://127.0.0.1:{router[1]}"
        return self.route(mode)

    def route(self, mode: str, timeout_s: float = 60.0) -> str:
        """(Re)start the router of ``mode`` (``baseline``, ``dualpath`` or ``split``; ``stock-router``: the stock
        ``sglang_router``, which sends no route hint, so every hit is read on the prefill side; ``stock``: the
        stock router over the stock servers) next to the other mode's, wait until it serves, and return its URL."""
        self.stop_router(mode)
        free = [p for p in self.config.router_ports if p not in {port for _, port in self.routers.values()}]
        if not free:
            raise RuntimeError(f"at most {ROUTERS} routers run side by side; running: {sorted(self.routers)}")
        stock_router = mode in (STOCK_ROUTER, STOCK)
        specs = self.config.stack(mode)
        if not {spec.port for spec in specs} <= {server.spec.port for server in self.servers}:
            raise RuntimeError(f"the {mode} router fronts servers this cluster did not start "
                               f"(servers={self.config.servers!r})")
        config = RouterConfig(tuple(PrefillSpec(s.url, s.bootstrap_port) for s in specs if s.role == "prefill"),
                              tuple(s.url for s in specs if s.role == "decode"), port=free[0],
                              prometheus_port=self.config.metrics_ports[self.config.router_ports.index(free[0])]
                              if stock_router else 0,
                              mode="baseline" if stock_router else mode, store_root=self.config.store_root,
                              read_tokens_per_s=self.config.nic_gbps * 1e9 / 8 / self.config.bytes_per_token,
                              gpu_tokens_per_s=self.config.prefill_tokens_per_s,
                              model_path=str(self.config.model) if has_tokenizer(self.config.model) else None)
        log = open(self.config.work_dir / "logs" / f"router-{mode}.log", "wb")  # noqa: SIM115 - lives with the process
        command = (launch_command(config) if stock_router
                   else [sys.executable, "-m", "dualpath.launch_router", *to_argv(config)])
        router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        url = f"http://127.0.0.1:{config.port}"
        self.routers[mode] = (router, config.port)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if router.poll() is not None:
                tail = (self.config.work_dir / "logs" / f"router-{mode}.log").read_text(errors="replace")[-2000:]
                self.stop_router(mode)
                raise RuntimeError(f"router exited with {router.returncode}:\n{tail}")
            if healthy(url, "/readiness"):
                return url
            time.sleep(0.5)
        self.stop_router(mode)
        raise RuntimeError(f"router not ready after {timeout_s} s")

    def flush(self, timeout_s: float = 120.0) -> None:
        """Empty every server's GPU and host KV caches (SGLang's /flush_cache, retried while busy)."""
        for server in self.servers:
            flush_cache(server.url, timeout_s)

    def wait_stored(self, prompts: list[list[int]], timeout_s: float = 60.0) -> bool:
        """Wait until the store holds every full page of ``prompts`` (decodes write back asynchronously)."""
        keys = [k for ids in prompts for k in block_keys(ids, PAGE_TOKENS)[: len(ids) // PAGE_TOKENS]]
        index = StoreIndex(self.config.store_root)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            namespaces = index.namespaces()
            if all(any(index.holds(k, n) for n in namespaces) for k in keys):
                return True
            time.sleep(0.2)
        return False

    def node_read_bytes(self) -> dict[str, int]:
        """Bytes each node's storage NIC has read (every server of the node, stock or DualPath), from the node
        state on this host."""
        if not self._nodes:
            directory = node_dir(self.config.store_root)
            self._nodes = [NodeReader(directory, node) for node in self.config.nodes]
        return {reader.node: reader.snapshot().read_bytes for reader in self._nodes}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time each node's servers have used so far."""
        used = dict.fromkeys(self.config.nodes, 0.0)
        for server in self.servers:
            used[server.spec.node] += server.cpu_seconds()
        return used

    def reset(self) -> None:
        """Empty every cache and the store, so the next run starts cold like the previous one."""
        self.flush()
        drop_all_blocks(self.config.store_root)

    def stop_router(self, mode: str | None = None) -> None:
        """Stop the router of ``mode`` (None: every router)."""
        for name in [mode] if mode is not None else list(self.routers):
            router, _ = self.routers.pop(name, (None, 0))
            if router is None or router.poll() is not None:
                continue
            router.terminate()
            try:
                router.wait(30)
            except subprocess.TimeoutExpired:
                router.kill()
                router.wait(10)

    def stop(self) -> None:
        """Stop every router and server, and wait until their ports can be bound again (so that the next
        :meth:`start`, or the other set's in :meth:`serve`, finds them free)."""
        stopped = bool(self.routers or self.servers)
        self.stop_router()
        stop_servers(self.servers)
        self.servers = []
        deadline = time.monotonic() + PORT_RELEASE_S
        while stopped and (busy := busy_ports(self.config)):
            if time.monotonic() > deadline:
                log.warning("ports still held %.0f s after the cluster stopped: %s", PORT_RELEASE_S, busy)
                break
            time.sleep(0.5)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
