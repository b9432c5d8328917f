"""A local cluster of real SGLang servers behind the DualPath router: A/B replay, clean shutdown."""

from __future__ import annotations

from pathlib import Path

import pytest
from dualpath.bench.traces import AgentTrace, Turn
from dualpath.cluster.ab import MODES, run_ab
from dualpath.cluster.local import ClusterConfig, LocalCluster, _port_free, _ports
from dualpath.cluster.servers import live_group_members

pytest.importorskip("sglang", reason="the cluster tests need `pip install sglang==0.5.17`")

AGENTS = [AgentTrace(f"a{i}", (Turn(0, 700 + 64 * i, 4), Turn(640, 200, 4), Turn(900, 100, 4))) for i in range(3)]


def test_ab_replay_reads_where_the_router_says_and_stops_cleanly(tmp_path: Path) -> None:
    config = ClusterConfig(tmp_path, prefill=1, decode=1, nic_gbps=0.5, base_port=34000)
    cluster = LocalCluster(config)
    try:
        cluster.start()
        leaders = [s.process.pid for s in cluster.servers]
        baseline, dualpath = run_ab(cluster, AGENTS, max_gen=4)
    finally:
        cluster.stop()
    assert [s.mode for s in (baseline, dualpath)] == list(MODES)
    for run in (baseline, dualpath):
        assert run.failed == 0 and run.requests == 6, run.first_error
        assert sum(run.node_read_bytes.values()) > 0  # every measured turn read its context from the store
    assert baseline.node_read_bytes["de0"] == 0  # baseline: the prefill side reads everything
    assert dualpath.node_read_bytes["de0"] > 0  # DualPath put some reads on the decode's NIC
    assert not any(live_group_members(pid) for pid in leaders)  # no server process left behind
    assert all(_port_free(port) for port in _ports(config))


def test_cluster_config_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1P0D"):
        ClusterConfig(tmp_path, prefill=1, decode=0)
    with pytest.raises(ValueError, match="nic_gbps"):
        ClusterConfig(tmp_path, nic_gbps=0)
