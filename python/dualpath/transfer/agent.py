"""A NIXL agent (UCX backend) that keeps account of everything it holds, so failure paths release it all."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from dualpath.transfer.config import TransferConfig
from dualpath.transfer.grid import LayerBlockGrid

# UCX reads its environment when a context is created; this lock keeps two agents of one process
# from seeing each other's class settings.
_ENV_LOCK = threading.Lock()


class Live(NamedTuple):
    """What an agent holds right now; all zero after :meth:`KVAgent.close`."""

    registrations: int
    dlists: int
    xfers: int
    peers: int


@contextmanager
def _ucx_env(overrides: dict[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class KVAgent:
    """Registered grids, prepared descriptor lists, transfer handles and known peers of one NIXL agent.

    The NIXL agent runs in strict thread-sync mode: callers, the completion poller and the control
    thread all use it. Handles that NIXL cannot release yet (a transfer still in flight to a dead peer)
    are kept and retried, never dropped.
    """

    def __init__(self, config: TransferConfig) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.name = config.name
        self.traffic_class = config.traffic_class
        with _ucx_env(config.qos.ucx_env()):
            self._nixl = nixl_agent(
                config.name,
                # NIXL's progress thread spins a whole core (no delay between polls); progress is
                # driven instead by the completion thread, only while transfers are under way.
                nixl_agent_config(
                    enable_prog_thread=False, backends=[], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
                ),
            )
            params = {"ucx_error_handling_mode": "peer"}
            if config.ucx_devices:
                params["ucx_devices"] = config.ucx_devices
            if config.ucx_threads:
                params["num_threads"] = str(config.ucx_threads)
            self._nixl.create_backend("UCX", params)
        self._lock = threading.Lock()
        self._registrations: dict[str, Any] = {}
        self._dlists: set[Any] = set()
        self._xfers: set[Any] = set()
        self._stuck: list[Any] = []
        self._peers: set[str] = set()

    # -- memory -------------------------------------------------------------------------------------
    def register(self, grid: LayerBlockGrid) -> None:
        if grid.name in self._registrations:
            raise ValueError(f"grid {grid.name!r} is already registered on agent {self.name!r}")
        regs = self._nixl.register_memory([(grid.base, grid.extent, grid.device, "")], grid.mem)
        with self._lock:
            self._registrations[grid.name] = regs

    def deregister(self, grid_name: str) -> None:
        with self._lock:
            regs = self._registrations.pop(grid_name, None)
        if regs is None:
            raise ValueError(f"grid {grid_name!r} is not registered on agent {self.name!r}")
        self._nixl.deregister_memory(regs)

    # -- peers --------------------------------------------------------------------------------------
    def metadata(self) -> bytes:
        return self._nixl.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        loaded = self._nixl.add_remote_agent(metadata)
        name = loaded.decode() if isinstance(loaded, bytes) else loaded
        with self._lock:
            self._peers.add(name)
        return name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            known = name in self._peers
            self._peers.discard(name)
        if known:
            self._nixl.remove_remote_agent(name)

    # -- descriptor lists ---------------------------------------------------------------------------
    def prep(self, peer: str | None, grid: LayerBlockGrid) -> Any:
        """Prepare every Layer Block of ``grid`` (local when ``peer`` is None) for indexed transfers."""
        handle = self._nixl.prep_xfer_dlist(peer or "NIXL_INIT_AGENT", grid.all_layer_blocks(), grid.mem)
        with self._lock:
            self._dlists.add(handle)
        return handle

    def release_dlist(self, handle: Any) -> None:
        with self._lock:
            self._dlists.discard(handle)
        self._nixl.release_dlist_handle(handle)

    # -- transfers ----------------------------------------------------------------------------------
    def post_indexed(
        self, local: Any, local_idx: np.ndarray, remote: Any, remote_idx: np.ndarray, notif: bytes = b""
    ) -> tuple[Any, bool]:
        """WRITE the indexed rows of a prepared local list into those of a prepared remote list.

        A non-empty ``notif`` reaches the peer's :meth:`progress` once the written bytes are in place.
        """
        xfer = self._nixl.make_prepped_xfer("WRITE", local, local_idx, remote, remote_idx, notif)
        return self._post(xfer)

    def post_descs(
        self, peer: str, src: np.ndarray, src_mem: str, dst: np.ndarray, dst_mem: str, notif: bytes = b""
    ) -> tuple[Any, bool]:
        """WRITE Nx3 source descriptors into the peer's Nx3 destination descriptors."""
        local = self._nixl.get_xfer_descs(src, src_mem)
        remote = self._nixl.get_xfer_descs(dst, dst_mem)
        return self._post(self._nixl.initialize_xfer("WRITE", local, remote, peer, notif))

    def _post(self, xfer: Any) -> tuple[Any, bool]:
        """Post ``xfer``; returns it and whether it already completed (shared-memory copies often do)."""
        with self._lock:
            self._xfers.add(xfer)
        state = self._nixl.transfer(xfer)
        if state == "ERR":
            self.release_xfer(xfer)
            raise OSError(f"agent {self.name!r}: NIXL refused to post a transfer")
        return xfer, state == "DONE"

    def progress(self) -> dict[str, list[bytes]]:
        """Let UCX make progress on this side; returns the notifications that arrived, by peer."""
        return self._nixl.get_new_notifs()

    def state(self, xfer: Any) -> str:
        """"PROC", "DONE" or "ERR"."""
        return self._nixl.check_xfer_state(xfer)

    def release_xfer(self, xfer: Any) -> None:
        with self._lock:
            self._xfers.discard(xfer)
        try:
            self._nixl.release_xfer_handle(xfer)
        except Exception:  # still in flight towards a peer that stopped answering: retry later
            with self._lock:
                self._stuck.append(xfer)

    def retry_stuck(self) -> int:
        """Try again to release handles NIXL could not release before; returns how many remain."""
        with self._lock:
            stuck, self._stuck = self._stuck, []
        for xfer in stuck:
            self.release_xfer(xfer)
        with self._lock:
            return len(self._stuck)

    def live(self) -> Live:
        with self._lock:
            xfers = len(self._xfers) + len(self._stuck)
            return Live(len(self._registrations), len(self._dlists), xfers, len(self._peers))

    def close(self) -> None:
        """Release transfers, then descriptor lists, peers and registrations — the order NIXL needs."""
        with self._lock:
            xfers, dlists = list(self._xfers), list(self._dlists)
            peers, grids = list(self._peers), list(self._registrations)
        for xfer in xfers:
            self.release_xfer(xfer)
        self.retry_stuck()
        for handle in dlists:
            self.release_dlist(handle)
        for peer in peers:
            self.remove_peer(peer)
        for name in grids:
            self.deregister(name)
