from __future__ import annotations

import gc
import json

import pytest
import simpy
from dualpath.cli import main as cli_main
from dualpath.scheduler import BatcherConfig, Chunk, ComputeQuotaBatcher, Request
from dualpath.sim import (
    DS27B_GEOMETRY,
    Cluster,
    ClusterSpec,
    HardwareSpec,
    build_workload,
    get_mode,
    get_model,
    parse_pd,
    run_offline,
    run_online,
)
from dualpath.sim.hardware import PrefillCost
from dualpath.traces import (
    SYNTHETIC,
    AgentTrace,
    Turn,
    load_claude_code,
    load_mooncake,
    synthetic_agents,
)
from hypothesis import given, settings
from hypothesis import strategies as st

DS27B = get_model("ds27b")


def offline(mode: str, agents: list[AgentTrace], pd: tuple[int, int] = (1, 1)) -> float:
    return run_offline(ClusterSpec(*pd, DS27B, get_mode(mode)), agents).makespan_s


def test_io_bound_setup_orders_oracle_dualpath_basic():
    agents = synthetic_agents("64k", 100, seed=1, distinct=100)
    basic, dualpath, oracle = (offline(m, agents) for m in ("basic", "dualpath", "oracle"))
    assert oracle <= dualpath < basic
    # 1P1D doubles the storage NICs that can read: the gain is real but bounded by 2x.
    assert 1.2 < basic / dualpath <= 2.05


def test_every_request_finishes_and_every_resource_is_released():
    spec = ClusterSpec(1, 1, DS27B, get_mode("split"), fetch_interval_s=0.01)
    cluster = Cluster(spec, simpy.Environment())
    done = []
    requests = [Request(i, (i * 7919) % 50_000, 1 + (i * 31) % 3000, 1 + i % 200) for i in range(300)]
    for r in requests:
        cluster.submit(r, done.append)
    cluster.env.run()
    assert sorted(j.request.request_id for j in done) == list(range(300))
    assert not cluster.jobs and cluster.scheduler.waiting_prefill == cluster.scheduler.waiting_decode == 0
    assert all(pe.seq == pe.tok == 0 and not pe.ready for pe in cluster.pes)
    assert all(de.seq == de.tok == de.reserved == 0 for de in cluster.des)
    assert all(nic.pending == 0 for nic in cluster.nics)
    read = sum(sum(nic.bytes_read.values()) for nic in cluster.nics)
    assert read == pytest.approx(sum(r.cached_tokens for r in requests) * DS27B.bytes_per_token)
    for job in done:
        assert job.arrival <= job.prefill_done < job.first_token <= job.finish
        assert job.tpot > 0


def test_runs_create_no_reference_cycles():
    # The runners pause the cyclic garbage collector for speed: that is only safe while finished requests are
    # freed by reference counting alone, so a collection in the middle of a run must find nothing.
    found: list[int] = []
    run_offline(ClusterSpec(1, 1, DS27B, get_mode("split")), synthetic_agents("64k", 40, distinct=40),
                progress=lambda now: found.append(gc.collect()))
    assert len(found) > 2 and not any(found[1:])  # the first one may collect earlier tests' garbage


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 20_000)), min_size=1, max_size=8),
       st.sampled_from(["ds660b", "ds27b"]), st.floats(0.01, 1.0))
def test_batches_priced_by_the_simulated_model_are_maximal(items, model_name, quota):
    # The batcher prices candidates incrementally with the simulator's cost model and searches the last chunk
    # by secant steps: the batch must still be the largest FIFO prefix that fits, priced whole.
    model, peak = get_model(model_name), HardwareSpec().peak_flops
    queue = [Chunk(i, cached, new) for i, (cached, new) in enumerate(items)]
    batch = ComputeQuotaBatcher(PrefillCost(model, peak, attention_only=True), BatcherConfig(quota)).form_batch(queue)

    def price(pairs: list[tuple[int, int]]) -> float:
        return model.prefill_seconds(pairs, peak, attention_only=True)

    pairs = [(c.cached, c.new) for c in batch]
    assert [c.key for c in batch] == list(range(len(batch))) and batch[:-1] == queue[: len(batch) - 1]
    assert price(pairs) <= quota or pairs == [(queue[0].cached, 1)]
    last, source = batch[-1], queue[len(batch) - 1]
    if last.new < source.new:
        assert price([*pairs[:-1], (last.cached, last.new + 1)]) > quota
    elif len(batch) < len(queue):
        assert price([*pairs, (queue[len(batch)].cached, 1)]) > quota


def test_oracle_reads_nothing_and_basic_reads_only_on_prefill_nodes():
    agents = synthetic_agents("32k", 8, distinct=8)
    for mode, readers in (("oracle", set()), ("basic", {0})):
        cluster = Cluster(ClusterSpec(1, 2, DS27B, get_mode(mode)))
        for agent in agents:
            for turn in agent.turns[:3]:
                cluster.submit(Request(len(cluster.jobs) + 10_000 * agents.index(agent), turn.context_tokens,
                                       turn.append_tokens, turn.gen_tokens), lambda job: None)
        cluster.env.run()
        assert {i for i, nic in enumerate(cluster.nics) if nic.bytes_read} == readers


def test_think_times_are_honoured():
    agent = AgentTrace("a", (Turn(0, 1000, 10), Turn(1010, 50, 10, think_s=30.0), Turn(1070, 50, 10, think_s=45.0)))
    assert offline("dualpath", [agent]) > 75.0


def test_online_capacity_separates_light_and_overload():
    pool = synthetic_agents("32k", 20, distinct=20)
    spec = ClusterSpec(1, 1, DS27B, get_mode("dualpath"))
    light = run_online(spec, pool, aps=0.05, duration_s=300, warmup_s=100)
    heavy = run_online(spec, pool, aps=20.0, duration_s=150, warmup_s=50)
    assert light.mean_ttft_s < 4.0 < heavy.mean_ttft_s
    # A trajectory's JCT is its turns' latencies end to end (no think time here): at least the TTFTs of its turns.
    shortest = min(len(a.turns) for a in pool)
    assert light.mean_trajectory_jct_s >= shortest * light.mean_ttft_s > 0
    with pytest.raises(ValueError, match="aps"):
        run_online(spec, pool, aps=0, duration_s=10, warmup_s=0)


def test_synthetic_sets_match_table_2():
    for name, spec in SYNTHETIC.items():
        agents = synthetic_agents(name, 500)
        turns = [len(a.turns) for a in agents]
        totals = [a.turns[-1].prompt_tokens + a.turns[-1].gen_tokens for a in agents]
        assert sum(turns) / 500 == pytest.approx(spec.turns, rel=0.1)
        assert sum(totals) / 500 == pytest.approx(spec.total, rel=0.1)
        assert max(totals) <= spec.max_len
        for a in agents[:20]:  # each turn's context is exactly the previous prompt plus its generation
            for prev, cur in zip(a.turns, a.turns[1:], strict=False):
                assert cur.context_tokens == prev.prompt_tokens + prev.gen_tokens
    assert synthetic_agents("64k", 3, seed=5) == synthetic_agents("64k", 3, seed=5)


def test_length_scales_multiply_every_turn_and_truncate_at_the_mal():
    base = build_workload("synthetic-64k", 600)
    assert build_workload("synthetic-64k", 600, append_scale=1.0, gen_scale=1.0) == base
    mal = SYNTHETIC["64k"].max_len
    longer = build_workload("synthetic-64k", 600, append_scale=4.0)
    for short, long in zip(base, longer, strict=True):
        assert 1 <= len(long.turns) <= len(short.turns)
        assert long.turns[-1].prompt_tokens + long.turns[-1].gen_tokens <= mal
        for turn, scaled in zip(short.turns, long.turns, strict=False):
            assert (scaled.append_tokens, scaled.gen_tokens) == (4 * turn.append_tokens, turn.gen_tokens)
        for prev, cur in zip(long.turns, long.turns[1:], strict=False):
            assert cur.context_tokens == prev.prompt_tokens + prev.gen_tokens
    assert sum(len(a.turns) for a in longer) < 0.5 * sum(len(a.turns) for a in base)  # rounds cut at the MAL
    assert longer[500].turns is longer[0].turns  # copies still share their records
    shorter = build_workload("synthetic-64k", 10, gen_scale=0.5)
    assert [len(a.turns) for a in shorter] == [len(a.turns) for a in base[:10]]
    assert all(t.gen_tokens >= 1 for a in shorter for t in a.turns)
    assert {len(a.turns) for a in build_workload("synthetic-64k", 10, append_scale=100.0)} == {1}
    with pytest.raises(ValueError, match="synthetic sets only"):
        build_workload("mooncake", 1, append_scale=2.0)
    with pytest.raises(ValueError, match="> 0"):
        build_workload("synthetic-64k", 1, gen_scale=0.0)


def test_trace_loaders_read_the_shared_traces():
    sessions = load_claude_code(limit=8)
    assert len(sessions) == 8 and all(a.turns for a in sessions)
    turns = [t for a in sessions for t in a.turns]
    assert sum(t.context_tokens for t in turns) / sum(t.prompt_tokens for t in turns) > 0.8  # agentic reuse
    assert all(t.append_tokens >= 1 for t in turns)
    mooncake = load_mooncake(limit=500)
    assert len(mooncake) == 500 and all(len(a.turns) == 1 for a in mooncake)
    assert [a.arrival_s for a in mooncake] == sorted(a.arrival_s for a in mooncake)
    assert any(a.turns[0].context_tokens > 0 for a in mooncake)


def test_bad_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="2P4D"):
        parse_pd("2x4")
    with pytest.raises(ValueError, match="synthetic-64k"):
        build_workload("nope", 1)
    with pytest.raises(ValueError, match="ds660b"):
        get_model("gpt")
    with pytest.raises(ValueError, match="no Claude Code"):
        load_claude_code(tmp_path)
    assert DS27B_GEOMETRY.layers == 30


def test_cli_writes_table_json_and_plot(tmp_path, capsys):
    assert cli_main(["simulate", "--model", "ds27b", "--pd", "1P1D", "--workload", "claude-code", "--agents", "2",
                     "--modes", "basic,dualpath", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in results] == ["basic", "dualpath"]
    assert all(r["finished"] == r["requests"] > 0 for r in results)
    assert (tmp_path / "offline_jct.png").stat().st_size > 0
    assert "simulated runs" in capsys.readouterr().out
