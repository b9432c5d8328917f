"""DualPath across hosts, on one machine: every role on an address of its own, sharing only the store and sockets.

The prefill, the decode, a stock SGLang server and the router each listen on their own loopback address
(127.0.0.2, .3, .5, .4) and advertise it (SGLang's ``--host`` and ``$SGLANG_HOST_IP``, the router's
``--host``); each sees the shared store through a path of its own (a symlink), as hosts see one 3FS mount at
their own mount points. The router reads the store's index through its own path and learns everything else
from the servers' reports over HTTP.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dualpath.router.config import PrefillSpec, RouterConfig, to_argv
from dualpath.scheduler.report import NodeReport
from test_cluster import _generate
from test_srt import _prompt

pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")

PE_HOST, DE_HOST, ROUTER_HOST, STOCK_HOST = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
PE_PORT, BOOTSTRAP, DE_PORT, STOCK_PORT, ROUTER_PORT = 31600, 31601, 31650, 31680, 31699
MAX_NEW = 8
# 625 kB/s a node: the router's alpha (3 s of reads, ~900 tokens) is under the prompt's hit, which is split.
NIC_GBPS = 0.005


def _bindable(host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(not all(map(_bindable, (PE_HOST, DE_HOST, ROUTER_HOST, STOCK_HOST))),
                                reason="this machine cannot bind 127.0.0.2-5 (loopback is not the whole 127/8)")


def _mount(root: Path, host: str, shared: Path) -> Path:
    """The shared store as ``host`` sees it: at a path of its own."""
    (root / host).mkdir()
    mount = root / host / "store"
    mount.symlink_to(shared, target_is_directory=True)
    return mount


def _moved(before: dict[str, NodeReport], pe: NodeReport, de: NodeReport) -> dict[str, tuple[int, ...]]:
    """Blocks moved since ``before``: the prefill's read by its NIC, from peers, fallbacks; the decode's read by
    its NIC and forwarded."""
    pe0, de0 = before["pe0"], before["de0"]
    return {"pe": (pe.pages_read - pe0.pages_read, pe.pages_from_peers - pe0.pages_from_peers,
                   pe.fallbacks - pe0.fallbacks),
            "de": (de.pages_read - de0.pages_read, de.pages_forwarded - de0.pages_forwarded)}


def _engine_up(router: str, engine: str) -> int:
    with urllib.request.urlopen(f"{router}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'dualpath_engine_up\{{engine="{re.escape(engine)}",role="\w+"\}} (\S+)', text)
    assert match, f"no dualpath_engine_up for {engine}"
    return int(float(match.group(1)))


def test_prefill_decode_and_router_on_their_own_hosts_use_the_de_path(tmp_path: Path) -> None:
    from dualpath.cluster.servers import ServerOptions, ServerSpec, flush_cache, healthy, start_servers, stop_servers
    from dualpath.kv import block_keys
    from dualpath.store import StoreIndex

    shared = tmp_path / "3fs"
    shared.mkdir()
    options = ServerOptions(tmp_path / "nowhere", tmp_path / "logs", transfer_timeout_s=10.0,
                            env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"})
    specs = [ServerSpec("prefill", PE_PORT, "pe0", BOOTSTRAP, NIC_GBPS, host=PE_HOST,
                        store_root=_mount(tmp_path, PE_HOST, shared)),
             ServerSpec("decode", DE_PORT, "de0", nic_gbps=NIC_GBPS, host=DE_HOST,
                        store_root=_mount(tmp_path, DE_HOST, shared)),
             ServerSpec("null", STOCK_PORT, host=STOCK_HOST, dualpath=False)]
    servers = start_servers(specs, options, timeout_s=400)
    pe, de, stock = servers
    router_mount = _mount(tmp_path, ROUTER_HOST, shared)
    config = RouterConfig((PrefillSpec(pe.url, BOOTSTRAP),), (de.url,), host=ROUTER_HOST, port=ROUTER_PORT,
                          mode="split", store_root=router_mount, read_tokens_per_s=NIC_GBPS * 1e9 / 8 / 2048)
    log = open(tmp_path / "logs" / "router.log", "wb")  # noqa: SIM115 - closed in finally
    router = subprocess.Popen([sys.executable, "-m", "dualpath.launch_router", *to_argv(config)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{ROUTER_HOST}:{ROUTER_PORT}"
    try:
        assert not (tmp_path / "nowhere").exists()
        for report in (pe.report(), de.report()):  # each advertises its own host, never 0.0.0.0 or 127.0.0.1
            assert report.kv_channel is not None
        assert (pe.report().kv_channel.host, de.report().kv_channel.host) == (PE_HOST, DE_HOST)
        deadline = time.monotonic() + 60
        while not healthy(url, "/readiness"):  # 200 once the router has a prefill and a decode up
            assert time.monotonic() < deadline and router.poll() is None, (tmp_path / "logs" / "router.log").read_text()
            time.sleep(0.5)

        ids = _prompt(11) * 4  # 1204 tokens: 18 full pages
        first = _generate(url, ids, MAX_NEW)
        assert first == _generate(stock.url, ids, MAX_NEW)
        keys = block_keys(ids, 64)[: len(ids) // 64]
        namespace = de.report().store_namespace
        deadline = time.monotonic() + 60
        while StoreIndex(router_mount).stored_prefix(keys, namespace) < len(keys):
            assert time.monotonic() < deadline, "the decode did not write the prompt back"
            time.sleep(0.2)
        for server in (pe, de):
            flush_cache(server.url, 30)
        before = {s.spec.node: s.report() for s in (pe, de)}
        second = _generate(url, ids, MAX_NEW)
        after = {s.spec.node: s.report() for s in (pe, de)}
        assert second == first  # the hit read back from the store, partly through the DE, gives the same tokens
        read = {node: after[node].read_tokens - before[node].read_tokens for node in after}
        assert read["de0"] > 0 and read["pe0"] > 0 and sum(read.values()) == 64 * len(keys), read
        # Blocks counted by the servers that moved them, in the reports (published a few times a second).
        expected = {"pe": (read["pe0"] // 64, read["de0"] // 64, 0), "de": (read["de0"] // 64,) * 2}
        deadline = time.monotonic() + 10
        while (counted := _moved(before, pe.report(), de.report())) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert counted == expected

        # A decode that dies is noticed from its missed reports alone: within the report timeout, plus one poll
        # interval and one poll's own timeout (1 s), of its last report.
        assert _engine_up(url, de.url) == 1
        os.killpg(de.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        bound = config.report_timeout_s + config.load_poll_interval_s + 1.0
        while _engine_up(url, de.url) == 1 and time.monotonic() - killed < bound + 10:
            time.sleep(0.05)
        noticed = time.monotonic() - killed
        print(f"dead decode noticed after {noticed:.2f} s (bound {bound:.1f} s)")
        assert noticed < bound + 1.0  # 1 s for this test's own scrapes on a busy machine
    finally:
        router.terminate()
        router.wait(30)
        log.close()
        stop_servers(servers)
