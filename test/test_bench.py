"""``dualpath bench``: agents against a running router (fake SGLang servers behind the real DualPath router), the
JSONL line in ``sglang.bench_serving``'s names, node reads from the servers, SLO and the agents/s search."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dualpath.cli import main as cli_main
from dualpath.cluster.ab import RunSummary, _difference, ratio_interval, result_records, summarise
from dualpath.cluster.online import Load, LoadResult, Slo, agent_pool, agents_for, capacity, run_load
from dualpath.cluster.progress import LineProgress, progress_for
from dualpath.cluster.replay import ReplayResult, RequestRecord, Streamed
from dualpath.traces import AgentTrace, Turn
from rich.console import Console
from rich.progress import Progress
from router_fakes import FakeEngine
from test_router import cluster, pd_fakes, run_async

# The result fields of `python -m sglang.bench_serving` (sglang 0.5.17, sglang/benchmark/serving.py) that an
# agent benchmark can fill; the test below checks the list against the installed package when it is there.
BENCH_SERVING_FIELDS = (
    "tag", "backend", "dataset_name", "request_rate", "max_concurrency", "server_info", "duration", "completed",
    "total_input_tokens", "total_output_tokens", "request_throughput", "input_throughput", "output_throughput",
    "total_throughput", *(f"{stat}_{name}_ms" for name in ("e2e_latency", "ttft", "tpot", "itl")
                          for stat in ("mean", "median", "std", "p90", "p95", "p99")),
    "concurrency", "max_output_tokens_per_s", "max_concurrent_requests")
BENCH_SERVING_DETAILS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")

# Each turn's context is the whole previous prompt and its 4-token answer.
AGENTS = [AgentTrace(f"a{i}", (Turn(0, 300, 4), Turn(304, 50, 4), Turn(358, 60, 4))) for i in range(3)]


def test_the_field_names_are_bench_servings():
    sglang = importlib.util.find_spec("sglang")  # its source only: importing it takes torch
    if sglang is None or sglang.origin is None:
        pytest.skip("checked against sglang's source when it is installed")
    source = (Path(sglang.origin).parent / "benchmark" / "serving.py").read_text()
    start = source.index('"tag": getattr(args, "tag", None)')
    result = source[start:source.index("if args.cache_report:", start)]
    names = set(re.findall(r'^\s*"(\w+)":', result, re.MULTILINE))
    assert set(BENCH_SERVING_FIELDS) <= names
    assert {"sharegpt_output_len", "accept_length"} <= names - set(BENCH_SERVING_FIELDS)  # the list is selective
    details = source[source.index("result_details = {"):]
    assert all(f'"{name}":' in details[:600] for name in BENCH_SERVING_DETAILS)


def bench(argv: list[str]) -> int:
    return cli_main(["bench", *argv])


@run_async
async def test_bench_writes_one_bench_serving_line_with_each_nodes_reads(tmp_path: Path):
    prefill, decode = pd_fakes(stream_ids=True, chunk_delay_s=0.01)
    prefill[0].read_bytes_per_request, decode[0].read_bytes_per_request = 300, 100
    out = tmp_path / "run.jsonl"
    async with cluster(prefill, decode) as (url, _, _):
        code = await asyncio.to_thread(bench, ["--base-url", url, "--num-prompts", "7", "--num-clients", "2",
                                               "--max-concurrency", "1", "--max-context", "100000",
                                               "--tag", "t1", "--output-file", str(out), "--output-details"])
        assert code == 0
        code = await asyncio.to_thread(bench, ["--base-url", url, "--num-prompts", "4", "--output-file", str(out)])
        assert code == 0
    first, second = (json.loads(line) for line in out.read_text().splitlines())  # appended, as bench_serving
    assert set(BENCH_SERVING_FIELDS + BENCH_SERVING_DETAILS) <= set(first)
    assert set(BENCH_SERVING_FIELDS) <= set(second) and "input_lens" not in second
    assert first["tag"] == "t1" and first["backend"] == "sglang" and first["dataset_name"] == "claude-code"
    assert first["completed"] == 7 and len(first["input_lens"]) == 7 and first["max_concurrent_requests"] == 1
    assert first["output_lens"] == [4] * 7 and all(len(itl) == 3 for itl in first["itls"])
    assert first["server_info"]["dualpath_mode"] == "dualpath"  # the router's own /get_server_info
    # Every request went to both the prefill (+300 bytes) and the decode (+100 bytes): read through their reports.
    assert first["node_read_bytes"] == {"node-p0": 7 * 300, "node-d0": 7 * 100}
    assert first["de_read_share"] == pytest.approx(0.25)
    turns = [r.body["input_ids"] for r in decode[0].received]
    assert len(turns) == 11


@run_async
async def test_each_agents_next_turn_resends_its_conversation_with_the_answer(tmp_path: Path):
    prefill, decode = pd_fakes(stream_ids=True)
    async with cluster(prefill, decode) as (url, _, _):
        result = await run_load(url, AGENTS, Load(9, clients=3, max_gen=4))
    assert len(result.records) == 9 and all(r.ok for r in result.records) and result.agents == 3
    by_agent: dict[int, list[list[int]]] = {}
    for received in decode[0].received:
        ids = received.body["input_ids"]
        by_agent.setdefault(ids[0], []).append(ids)  # the first ids of a conversation tell agents apart
    assert sorted(len(prompts) for prompts in by_agent.values()) == [3, 3, 3]
    for prompts in by_agent.values():
        for earlier, later in itertools.pairwise(prompts):
            context = [*earlier, 100, 101, 102, 103]  # the prompt and the answer it got
            assert later[:len(context)] == context and len(later) > len(context)


@run_async
async def test_online_agents_arrive_in_order_and_sending_stops_at_num_prompts():
    prefill, decode = pd_fakes(stream_ids=True)
    async with cluster(prefill, decode) as (url, _, _):
        result = await run_load(url, AGENTS, Load(10, agent_rate=200.0, max_gen=4), seed=3)
    assert len(result.records) == 10 and len(decode[0].received) == 10  # 12 turns in 4 agents; 10 sent
    firsts = sorted((r for r in result.records if r.turn == 0), key=lambda r: r.start_s)
    assert [r.agent_id for r in firsts] == ["a0", "a1", "a2", "a0#2"]


def test_a_stock_server_without_workers_gives_no_node_fields(tmp_path: Path):
    async def run() -> None:
        engine = FakeEngine("null", "solo", stream_ids=True)
        url = await engine.start()
        try:
            assert await asyncio.to_thread(bench, ["--base-url", url, "--num-prompts", "2",
                                                   "--output-file", str(tmp_path / "o.jsonl")]) == 0
        finally:
            await engine.stop()

    asyncio.run(run())
    line = json.loads((tmp_path / "o.jsonl").read_text())
    assert line["completed"] == 2 and line["node_read_bytes"] is None and line["de_read_share"] is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--request-rate", "-1"], "rates must be positive"),
    (["--num-clients", "0"], "--num-clients must be >= 1"),
    (["--max-context", "10"], "fits --max-context 10"),
    (["--base-url", "http://127.0.0.1:9"], "nothing answers at http://127.0.0.1:9"),
])
def test_bad_input_is_a_clear_error(argv: list[str], message: str, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench(["--base-url", "http://127.0.0.1:9", "--output-file", str(tmp_path / "x.jsonl"), *argv])
    assert message in str(exit_info.value)
    assert not (tmp_path / "x.jsonl").exists()


def record(ttft_s: float, tpot_s: float, ok: bool = True) -> RequestRecord:
    return RequestRecord("a", 0, 10, 0, 5 if ok else 0, 0.0, ttft_s, ttft_s + 4 * tpot_s, ok)


def test_the_slo_is_the_papers_means_and_attainment_counts_requests():
    slo = Slo(ttft_s=4.0, tpot_s=0.05)
    within, slow_first, slow_tokens = record(1.0, 0.01), record(9.0, 0.01), record(1.0, 0.2)
    assert slo.met([within, within, slow_first])
    assert slo.attainment([within, within, slow_first]) == pytest.approx(2 / 3)
    assert not slo.met([within, slow_first])  # mean TTFT 5 s
    assert not slo.met([within, slow_tokens])  # mean TPOT 105 ms
    assert not slo.met([within, record(0.0, 0.0, ok=False)])  # a failed request fails the run
    assert not slo.met([]) and slo.attainment([]) == 0.0


def test_capacity_finds_the_highest_rate_that_meets_the_slo_to_its_resolution():
    def run_at(rate: float) -> LoadResult:
        return LoadResult([record(1.0 if rate <= 0.37 else 9.0, 0.01)], 1.0, 1, 1)

    aps, probes = capacity(run_at, Slo(), 0.05, 1.0, 0.02)
    assert 0.37 - 0.02 <= aps <= 0.37 and probes[0].agent_rate == 0.05 and probes[1].agent_rate == 1.0
    assert [p.met for p in probes] == [p.agent_rate <= 0.37 for p in probes]
    assert capacity(run_at, Slo(), 0.5, 1.0, 0.1)[0] == 0.0  # even the lowest misses
    assert capacity(run_at, Slo(), 0.1, 0.3, 0.1)[0] == 0.3  # even the highest meets it
    with pytest.raises(ValueError, match="0 < low < high"):
        capacity(run_at, Slo(), 1.0, 0.5, 0.1)


def test_agents_cover_the_prompts_and_copies_get_ids_of_their_own():
    chosen = agents_for(AGENTS, 10, at_least=2)
    assert [a.agent_id for a in chosen] == ["a0", "a1", "a2", "a0#2"]
    assert [a.agent_id for a in agents_for(AGENTS, 2, at_least=5)] == ["a0", "a1", "a2", "a0#2", "a1#2"]
    pool = agent_pool("claude-code", None, 0.25, 20_000, turns=3)
    assert pool and all(len(a.turns) <= 3 for a in pool)
    assert [len(a.turns) for a in pool] == sorted((len(a.turns) for a in pool), reverse=True)
    with pytest.raises(ValueError, match="unknown dataset"):
        agent_pool("sharegpt", None, 1.0, 1000)


def test_a_ratios_interval_holds_the_truth_and_narrows_with_samples():
    rng = np.random.default_rng(0)
    small = ratio_interval(np.median, rng.normal(10, 2, 20), rng.normal(20, 4, 20))
    large = ratio_interval(np.median, rng.normal(10, 2, 2000), rng.normal(20, 4, 2000))
    assert small is not None and large is not None
    assert small[0] < 2.0 < small[1] and large[0] < 2.0 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    same = rng.normal(5, 1, 50)
    assert ratio_interval(np.mean, same, same, paired=True) == (1.0, 1.0)  # paired: the same draws cancel
    assert ratio_interval(np.mean, same, same)[0] < 1.0  # unpaired: they do not
    assert ratio_interval(np.mean, [1.0], [2.0, 3.0]) is None


def test_ab_records_carry_each_ratios_interval():
    def summary(mode: str, speed: float) -> RunSummary:
        records = [RequestRecord(f"a{agent}", turn, 1000, 900, 5, 0.0, 0.5 / speed + 0.01 * agent,
                                 (0.5 + 0.4) / speed + 0.01 * agent, True, token_intervals_s=(0.1 / speed,) * 4)
                   for turn in (1, 2, 3) for agent in range(4)]
        round_s = tuple(4 / speed + 0.1 * turn for turn in range(3))
        return summarise(mode, ReplayResult(tuple(records), {}, round_s), {"pe0": 1, "de0": 1}, 1.0)

    records = {r["metric"]: r for r in result_records([summary("baseline", 1.0), summary("split", 2.0)], "c", {})}
    throughput = records["throughput"]
    assert throughput["ratio"] == pytest.approx(throughput["value"] / throughput["baseline_value"])
    low, high = throughput["ratio_ci95"]
    assert low <= throughput["ratio"] <= high and low > 1.9
    assert records["ttft_p50"]["ratio_ci95"][0] <= records["ttft_p50"]["ratio"] <= records["ttft_p50"]["ratio_ci95"][1]
    assert records["de_read_share"]["ratio_ci95"] is None


def test_an_answer_asked_again_differs_on_any_top_k_change():
    got = ((( -0.5, 7), (-1.5, 9)), ((-0.25, 3), (-2.0, 4)))
    assert _difference(got, Streamed([7, 3], 0.1, (0.01,), got)) == ""
    assert _difference(got, Streamed([7, 3], 0.1, (0.01,), (got[0], ((-0.25, 3), (-2.002, 4))))) != ""
    assert _difference(got, Streamed([7, 3], 0.1, (0.01,), (got[0], ((-0.25, 3), (-2.0, 5))))) != ""  # a token
    assert _difference(got, Streamed([7], 0.1, (), got[:1])) != ""  # a token short
    assert _difference(got, Streamed([7, 3], 0.1, (0.01,), ())) == "no logprobs in the answer"
    assert _difference((), Streamed([7, 3], 0.1, (0.01,), ())) == "no logprobs in the answer"  # nothing to compare
    assert "TimeoutError" in _difference(got, TimeoutError("late"))


class QueueCluster:
    """A stand-in for LocalCluster in the online A/B: each stack a queue whose mean TTFT grows with the agent
    rate towards its capacity; the decode node reads a share of every probe's bytes in ``split``."""

    def __init__(self) -> None:
        self.capacity = {"stock": 0.3, "split": 0.6}
        self.config = SimpleNamespace(bytes_per_token=10)
        self.serving, self.resets, self.read = "", 0, {"pe0": 0, "de0": 0}

    def serve(self, mode: str) -> str:
        self.serving = mode
        return f"http://{mode}"

    def reset(self) -> None:
        self.resets += 1

    def node_read_bytes(self) -> dict[str, int]:
        return dict(self.read)

    def stop_router(self) -> None:
        self.serving = ""

    async def run_load(self, url: str, pool, load: Load, seed: int, on_done=None) -> LoadResult:
        assert url == f"http://{self.serving}" and self.resets  # every probe after a reset, on its stack
        utilisation = load.agent_rate / self.capacity[self.serving]
        ttft = 1.0 / max(1 - utilisation, 1e-3)  # M/M/1-like: 1 s idle, 4 s at 75% of capacity
        self.read["pe0"] += 600 if self.serving == "split" else 1000
        self.read["de0"] += 400 if self.serving == "split" else 0
        return LoadResult([RequestRecord("a", 1, 100, 80, 5, 0.0, ttft, ttft + 0.04, True)] * 2, 10.0, 1, 1)


def test_the_online_ab_finds_each_stacks_agents_per_second_and_bounds_the_ratio(monkeypatch, tmp_path: Path):
    from dualpath.cluster import online_ab

    fake = QueueCluster()
    monkeypatch.setattr(online_ab, "run_load", fake.run_load)
    slo, resolution = Slo(4.0, 0.05), 0.01
    stacks = online_ab.run_online_ab(fake, ("stock", "split"), AGENTS, Load(10), slo, 0.05, 1.0, resolution)
    base, dual = stacks
    # Mean TTFT reaches 4 s at 75% of capacity: 0.225 and 0.45 agents/s.
    assert 0.225 - resolution <= base.aps <= 0.225 and 0.45 - resolution <= dual.aps <= 0.45
    assert fake.resets == len(base.probes) + len(dual.probes) and fake.serving == ""
    assert all(p.node_read_bytes == {"pe0": 600, "de0": 400} and p.de_read_share == 0.4 for p in dual.probes)
    assert all(p.store_share == pytest.approx(1000 / (2 * 80 * 10)) for p in base.probes)
    records = {r["metric"]: r for r in online_ab.online_records(stacks, resolution, 1.0, "c", ">= 1.6x", "stock")}
    aps = records["agents_per_s_at_slo"]
    low, high = aps["ratio_bounds"]
    assert aps["ratio"] == pytest.approx(dual.aps / base.aps) and low <= 2.0 <= high and high - low < 0.2
    assert records["de_read_share_at_aps"]["value"] == 0.4 and records["de_read_share_at_aps"]["baseline_value"] == 0
    online_ab.write_online(tmp_path / "online.json", stacks, list(records.values()))
    assert json.loads((tmp_path / "online.runs.json").read_text())[1]["aps"] == dual.aps


def test_the_aps_ratio_is_bounded_by_the_search_resolution():
    from dualpath.cluster.online_ab import StackCapacity, aps_bounds, ratio_bounds

    assert aps_bounds(0.2, 0.05, 1.0) == (0.2, 0.25)
    assert aps_bounds(1.0, 0.05, 1.0) == (1.0, float("inf"))  # even the highest rate met the SLO
    base, dual = StackCapacity("stock", 0.2, []), StackCapacity("split", 0.4, [])
    assert ratio_bounds(base, dual, 0.05, 1.0) == pytest.approx((0.4 / 0.25, 0.45 / 0.2))
    assert ratio_bounds(StackCapacity("stock", 0.0, []), dual, 0.05, 1.0) is None  # the baseline met nothing


@pytest.mark.parametrize(("argv", "message"), [
    (["--search-aps", "1", "0.5"], "needs 0 < LOW < HIGH"),
    (["--search-aps", "0.1", "0.5", "--aps-resolution", "0"], "--aps-resolution > 0"),
    (["--search-aps", "0.1", "0.5", "--kv-tokens", "100"], "--kv-tokens must be >= 1024"),
    (["--search-aps", "0.1", "0.5", "--num-prompts", "0"], "--num-prompts must be >= 1"),
])
def test_the_online_ab_refuses_bad_input_before_starting_anything(argv: list[str], message: str, tmp_path: Path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["ab", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *argv])
    assert message in str(exit_info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_long_runs_print_progress_lines_where_the_console_is_not_a_terminal():
    log = io.StringIO()
    with progress_for(Console(file=log, force_terminal=False)) as progress:
        assert isinstance(progress, LineProgress)
        task = progress.add_task("   split", total=40)
        for _ in range(39):
            progress.advance(task)
        assert log.getvalue().count("\n") == 9  # a line at every tenth passed, none before
        progress.advance(task)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].endswith("split 4/40 (0 s)") and "split 40/40" in lines[-1]
    assert isinstance(progress_for(Console(file=io.StringIO(), force_terminal=True)), Progress)
