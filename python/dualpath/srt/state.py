"""What a server's scheduler process knows and its HTTP process reports: store namespace and DualPath counters.

SGLang's HTTP app runs in the server's main process; the storage backend, its KV channel and their counters
live in the scheduler process. The scheduler process writes them to a small host-local file
(``SrtConfig.state_path``, one per tensor-parallel rank) a few times a second; the HTTP process reads them
for ``GET /dualpath/info`` (:meth:`ServerReporter.report`). The same counters feed SGLang's ``/metrics`` as
``dualpath_*`` Prometheus counters (SGLang collects every process's metrics with ``--enable-metrics``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
from dualpath.scheduler.report import NodeReport
from dualpath.srt.config import SrtConfig
from dualpath.store import NodeReader, ReadQueue, node_dir

PUBLISH_PERIOD_S = 0.2


class ServerState(msgspec.Struct, kw_only=True):
    store_namespace: str = ""
    pages_read: int = 0
    pages_from_peers: int = 0
    pages_forwarded: int = 0
    pages_forwarded_from_memory: int = 0
    bytes_forwarded: int = 0
    fallbacks: int = 0
    transfer_timeouts: int = 0
    pages_layerwise: int = 0
    layers_from_slots: int = 0


COUNTERS = tuple(f for f in ServerState.__struct_fields__ if f != "store_namespace")
# Prometheus counter (``_total`` appended), the side label of blocks read, and help; labels role and node too.
METRICS = {
    "pages_read": ("dualpath_blocks_read", "pe", "KV blocks read for this server, by the NIC that read them"),
    "pages_from_peers": ("dualpath_blocks_read", "de", "KV blocks read for this server, by the NIC that read them"),
    "pages_forwarded": ("dualpath_blocks_forwarded", "", "KV blocks a decode server read and forwarded to a prefill"),
    "pages_forwarded_from_memory": ("dualpath_blocks_forwarded_from_memory", "", "KV blocks a decode server "
                                    "forwarded to a prefill from its own host memory, not read from the store"),
    "bytes_forwarded": ("dualpath_bytes_forwarded", "", "bytes of KV forwarded DE -> PE"),
    "fallbacks": ("dualpath_fallbacks", "", "a decode server's part read on the prefill's NIC after a failure"),
    "transfer_timeouts": ("dualpath_transfer_timeouts", "", "DE -> PE KV transfers that timed out"),
    "pages_layerwise": ("dualpath_blocks_layerwise", "", "KV blocks from a decode server that the prefill's forward "
                        "took layer by layer, admitted before their last layer landed"),
    "layers_from_slots": ("dualpath_block_layers_from_slots", "", "layers of KV blocks from a decode server that the "
                          "prefill placed from its staging slots straight into the device pool, still landing"),
}


class StatePublisher:
    """Scheduler side: counts, and rewrites the state file every ``PUBLISH_PERIOD_S`` while anything changed."""

    def __init__(self, config: SrtConfig, pages_read: Callable[[], int]) -> None:
        """``pages_read``: this server's store reads so far (the store counts them; read at every publication)."""
        from prometheus_client import Counter  # after SGLang set $PROMETHEUS_MULTIPROC_DIR (spawned processes)

        self.path = config.state_path()
        self._pages_read = pages_read
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._state = ServerState()
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        labels = {"role": config.role, "node": config.node}
        families: dict[str, Counter] = {}
        self._metrics = {}
        for field, (name, side, text) in METRICS.items():
            if name not in families:  # registry=None: SGLang's /metrics reads every process's multiprocess files
                families[name] = Counter(name, text, [*labels, "side"] if side else list(labels), registry=None)
            self._metrics[field] = families[name].labels(**labels, **({"side": side} if side else {}))
        self._dirty.set()
        self._thread = threading.Thread(target=self._run, name="dualpath-state", daemon=True)
        self._thread.start()

    def set_namespace(self, namespace: str) -> None:
        with self._lock:
            self._state.store_namespace = namespace
        self._dirty.set()

    def snapshot(self) -> ServerState:
        with self._lock:
            return msgspec.structs.replace(self._state)

    def count(self, **deltas: int) -> None:
        with self._lock:
            for field, delta in deltas.items():
                setattr(self._state, field, getattr(self._state, field) + delta)
        for field, delta in deltas.items():
            self._metrics[field].inc(delta)
        self._dirty.set()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_PERIOD_S):
            read = self._pages_read() - self._state.pages_read
            if read:
                self.count(pages_read=read)
            if self._dirty.is_set():
                self._dirty.clear()
                self._write()

    def _write(self) -> None:
        with self._lock:
            raw = msgspec.json.encode(self._state)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, self.path)  # the HTTP process never sees half a file

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


class ServerReporter:
    """HTTP side: this server's :class:`NodeReport`, from the state file and the node's read queue."""

    def __init__(self, config: SrtConfig) -> None:
        self.config = config
        self._node: NodeReader | None = None

    def _state(self) -> ServerState:
        """The server's counters summed over its tensor-parallel ranks; rank 0's store namespace."""
        ranks = [self._rank_state(rank) for rank in range(self.config.tp_size)]
        return ServerState(store_namespace=ranks[0].store_namespace,
                           **{field: sum(getattr(rank, field) for rank in ranks) for field in COUNTERS})

    def _rank_state(self, rank: int) -> ServerState:
        with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
            return msgspec.json.decode(self.config.state_path(rank).read_bytes(), type=ServerState)
        return ServerState()  # the scheduler process has not published yet

    def report(self) -> NodeReport:
        config, state = self.config, self._state()
        if self._node is None and Path(config.store_root).is_dir():
            self._node = NodeReader(node_dir(Path(config.store_root)), config.node)
        queue = self._node.snapshot() if self._node is not None else ReadQueue.idle(config.node)
        rate = queue.rate_bytes_per_s or 0.0
        return NodeReport(
            role=config.role, node=config.node, model=config.model, page_size=config.page_size, tp_size=config.tp_size,
            kv_channel=config.server_channel if state.store_namespace else None, store_namespace=state.store_namespace,
            queued_tokens=queue.queued_tokens, queued_bytes=queue.queued_bytes,
            inflight_tokens=queue.inflight_tokens, inflight_bytes=queue.inflight_bytes,
            read_tokens=queue.read_tokens, read_bytes=queue.read_bytes, nic_bytes_per_s=rate,
            queue_s=queue.pending_bytes / rate if rate else 0.0,
            **{field: getattr(state, field) for field in COUNTERS},
        )
