"""A local cluster of real SGLang servers behind the DualPath router: A/B replay, clean shutdown."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from dualpath.cluster.ab import run_ab
from dualpath.cluster.local import (
    STOCK,
    STOCK_PORT_OFFSET,
    ClusterConfig,
    LocalCluster,
    _ephemeral_ports,
    busy_ports,
)
from dualpath.cluster.replay import same_logprobs
from dualpath.cluster.servers import TINY_MODEL, live_group_members, with_random_weights
from dualpath.traces import AgentTrace, Turn

pytest.importorskip("sglang", reason="the cluster tests need `pip install sglang==0.5.17`")

AGENTS = [AgentTrace(f"a{i}", (Turn(0, 700 + 64 * i, 4), Turn(640, 200, 4), Turn(900, 100, 4))) for i in range(3)]


def test_ab_replay_reads_where_the_router_says_and_stops_cleanly(tmp_path: Path) -> None:
    model = with_random_weights(TINY_MODEL, tmp_path / "tiny_llama")  # outputs that depend on the KV
    # 625 kB/s a node: the router's alpha (3 s of reads) is ~900 tokens, so a round's hits are split.
    config = ClusterConfig(tmp_path, prefill=1, decode=1, nic_gbps=0.005, base_port=29000, model=model,
                           server_args=("--load-format", "safetensors"), servers="both")
    cluster = LocalCluster(config)
    try:
        cluster.start()
        stock, ours = run_ab(cluster, AGENTS, max_gen=4, mode="baseline", baseline=STOCK)
        leaders = [s.process.pid for s in cluster.servers]
        baseline, dualpath = run_ab(cluster, AGENTS, max_gen=4, mode="split")
    finally:
        cluster.stop()
    assert [s.mode for s in (baseline, dualpath)] == ["baseline", "split"]
    for run in (baseline, dualpath):
        assert run.failed == 0 and run.requests == 6, run.first_error
        assert sum(run.node_read_bytes.values()) > 0  # every measured turn read its context from the store
        assert all(len(r["token_intervals_s"]) == r["output_tokens"] - 1 for r in run.records)
        assert 0 < run.itl_p50_s <= run.itl_p99_s
    assert baseline.node_read_bytes["de0"] == 0  # baseline: the prefill side reads everything
    # Each mode's last answers, asked again through the other router (hits read on its path), came out the same.
    for run in (baseline, dualpath):
        assert run.outputs_checked == 3 and not run.outputs_differing, run.outputs_differing
    # Negative control: with these weights answers depend on the prompt, so a changed KV would show.
    last = [r["top_logprobs"] for r in baseline.records if r["turn"] == 2]
    assert len(last) == 3 and not same_logprobs(last[0], last[1])
    # The stock stack (stock sglang_router, stock servers with the block store as their HiCache backend) read
    # every hit on its prefill, through the same node as ours, and answered as DualPath's servers do.
    assert [stock.mode, ours.mode] == [STOCK, "baseline"]
    assert (tmp_path / "logs" / f"prefill-{29000 + STOCK_PORT_OFFSET}.log").is_file()
    for run in (stock, ours):
        assert run.failed == 0 and run.requests == 6, run.first_error
        assert run.node_read_bytes["de0"] == 0 and run.node_read_bytes["pe0"] > 0
        assert run.outputs_checked == 3 and not run.outputs_differing, run.outputs_differing
    assert min(dualpath.node_read_bytes.values()) > 0  # split reads: both NICs read
    assert not any(live_group_members(pid) for pid in leaders)  # no server process left behind
    assert not busy_ports(config)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _generate(url: str, ids: list[int], max_new: int) -> list[int]:
    body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                                             "ignore_eos": True}}).encode()
    request = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)["output_ids"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read()[:500]!r}") from exc


def test_a_decode_killed_while_it_reads_for_a_request_loses_no_request(tmp_path: Path) -> None:
    # 1P2D behind the DualPath router. Turn 2 of four sessions finds its context in the store; once a decode
    # is reading a DE-side request's pages through its NIC, that decode is killed (its whole process group,
    # SIGKILL). The prefill gives up on its pages and the router places the request again on the other pair:
    # every request completes, with the tokens it asked for.
    config = ClusterConfig(tmp_path, prefill=1, decode=2, nic_gbps=0.004, base_port=29200, transfer_timeout_s=10.0)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 32000) for _ in range(1536)] for _ in range(4)]
    cluster = LocalCluster(config)
    try:
        cluster.start()
        leaders = [s.process.pid for s in cluster.servers]
        url = cluster.route("dualpath")
        with ThreadPoolExecutor(len(prompts)) as pool:
            outputs = list(pool.map(lambda ids: _generate(url, ids, 4), prompts))
            assert cluster.wait_stored(prompts, timeout_s=180), "the decodes did not write turn 1 back"
            cluster.flush()
            seen = len(_get(f"{url}/dualpath/decisions")["decisions"])
            turn2 = [ids + out + [rng.randrange(3, 32000) for _ in range(64)]
                     for ids, out in zip(prompts, outputs, strict=True)]
            pending = [pool.submit(_generate, url, ids, 8) for ids in turn2]
            victim = None
            deadline = time.monotonic() + 120
            while victim is None and time.monotonic() < deadline and not all(f.done() for f in pending):
                for d in _get(f"{url}/dualpath/decisions")["decisions"][seen:]:
                    server = next(s for s in cluster.servers if s.url == d["decode"])
                    if d["side"] == "de" and server.report().pending_tokens > 0:
                        victim = server
                        break
                time.sleep(0.05)
            decisions = _get(f"{url}/dualpath/decisions")["decisions"][seen:]
            assert victim is not None, f"no decode read a DE-side request's pages; decisions: {decisions}"
            os.killpg(victim.process.pid, signal.SIGKILL)
            answers = [f.result() for f in pending]
        assert [len(a) for a in answers] == [8] * len(turn2)
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        retries = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("dualpath_router_retries_total"))
        assert retries >= 1
        after = _get(f"{url}/dualpath/decisions")["decisions"]
        assert any(d["decode"] != victim.url for d in after[seen + len(turn2):])  # the retry went to the other pair
    finally:
        cluster.stop()
    assert not any(live_group_members(pid) for pid in leaders)
    assert not busy_ports(config)


def test_busy_ports_names_each_held_port_with_the_states_of_its_sockets(tmp_path: Path) -> None:
    config = ClusterConfig(tmp_path, base_port=28400)
    port = config.router_ports[0]
    assert not busy_ports(config)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert busy_ports(config) == {port: ["LISTEN"]}
    assert not busy_ports(config)


def test_cluster_config_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1P0D"):
        ClusterConfig(tmp_path, prefill=1, decode=0)
    with pytest.raises(ValueError, match="nic_gbps"):
        ClusterConfig(tmp_path, nic_gbps=0)
    with pytest.raises(ValueError, match="ephemeral port range"):
        ClusterConfig(tmp_path, base_port=_ephemeral_ports()[0] + 200)
    with pytest.raises(ValueError, match="share a port"):
        ClusterConfig(tmp_path, prefill=6)  # the 6th prefill would listen where the first decode does


@pytest.mark.parametrize("cores", [2, 3, 16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 4), (3, 1)])
def test_prefills_and_decodes_get_disjoint_cores_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         cores: int, shape: tuple[int, int]) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    config = ClusterConfig(tmp_path, *shape)
    prefill = {c for s in config.specs() if s.role == "prefill" for c in s.cpus}
    decode = {c for s in config.specs() if s.role == "decode" for c in s.cpus}
    assert all(s.cpus for s in config.specs()) and not prefill & decode and prefill | decode <= set(range(cores))
    assert all(not s.cpus for s in replace(config, cpu=False).specs())  # GPUs: the kernel places processes


def test_up_serves_a_cluster_that_bench_attaches_to_until_interrupted(tmp_path: Path) -> None:
    """`dualpath up`, then `dualpath bench --base-url` from another process: bench_serving's JSONL with every node's
    reads; Ctrl-C (SIGINT) stops every process `up` started."""
    from test_bench import BENCH_SERVING_FIELDS

    # The default (storage-bound) NIC cap: hits beyond the router's alpha (~900 tokens) are split.
    up = subprocess.Popen([sys.executable, "-m", "dualpath.cli", "up", "--base-port", "28000",
                           "--work-dir", str(tmp_path / "up")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "COLUMNS": "300"})
    lines: list[str] = []
    try:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "serving at " in line:
                break
        url = re.search(r"serving at (\S+)", "".join(lines))
        assert url, "".join(lines)
        out = tmp_path / "bench.jsonl"
        # Twice, the same agents (the same seed), the caches flushed through the router in between: the first run's
        # hits stay in the servers' memory (the prefill reads nothing it holds); the second finds them in the store.
        for flush in (False, True):
            if flush:
                with urllib.request.urlopen(urllib.request.Request(f"{url[1]}/flush_cache", method="POST"),
                                            timeout=120) as response:
                    assert response.status == 200
            bench = subprocess.run([sys.executable, "-m", "dualpath.cli", "bench", "--base-url", url[1],
                                    "--num-prompts", "6", "--num-clients", "2", "--scale", "0.05", "--max-gen", "4",
                                    "--output-file", str(out)], capture_output=True, text=True, timeout=300)
            assert bench.returncode == 0, bench.stderr
        first, line = (json.loads(text) for text in out.read_text().splitlines())
        assert set(BENCH_SERVING_FIELDS) <= set(line) and first["completed"] == line["completed"] == 6
        assert set(line["node_read_bytes"]) == {"pe0", "de0"} and sum(line["node_read_bytes"].values()) > 0
        assert 0 < line["de_read_share"] < 1  # split mode: both nodes' NICs read
        pgids = [int(p) for p in re.findall(r"pid (\d+)", "".join(lines))]
        assert len(pgids) == 3, lines  # the router and both servers
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0
    finally:
        if up.poll() is None:  # a failed assertion: still stop what `up` started, as Ctrl-C does
            up.send_signal(signal.SIGINT)
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    assert not any(live_group_members(pid) for pid in pgids)
    config = ClusterConfig(tmp_path, base_port=28000)
    assert not busy_ports(config)
