from __future__ import annotations

import pytest
from dualpath.scheduler import (
    MODES,
    READ_POLICIES,
    EngineGroup,
    EngineLoad,
    GlobalScheduler,
    NodeLoad,
    ReadSide,
    Request,
    SchedulerConfig,
    get_mode,
)
from dualpath.scheduler.placement import split_tokens
from hypothesis import given, settings
from hypothesis import strategies as st

requests_st = st.lists(
    st.builds(Request, st.just(0), st.integers(0, 60_000), st.integers(1, 4_000), st.integers(0, 500)),
    min_size=1, max_size=40,
).map(lambda rs: [Request(i, r.cached_tokens, r.new_tokens, r.gen_tokens) for i, r in enumerate(rs)])


def one_pe_one_de(pe_engines: int = 4, de_engines: int = 4, **config: object) -> GlobalScheduler:
    groups = [EngineGroup(0, "prefill", tuple(range(pe_engines))),
              EngineGroup(1, "decode", tuple(range(100, 100 + de_engines)))]
    return GlobalScheduler(groups, SchedulerConfig(**config))  # type: ignore[arg-type]


def de_loads(free: list[int], tok: list[int] | None = None, node: int = 1) -> list[EngineLoad]:
    tok = tok or [0] * len(free)
    return [EngineLoad(100 + i, node, 0, t, f) for i, (f, t) in enumerate(zip(free, tok, strict=True))]


@settings(max_examples=150, deadline=None)
@given(requests_st, st.lists(st.integers(0, 400_000), min_size=4, max_size=4),
       st.lists(st.integers(0, 8_000_000), min_size=2, max_size=2))
def test_no_prefill_engine_above_beta_gets_work_and_short_queues_win(requests, toks, read_qs):
    sched = one_pe_one_de(beta_tokens=200_000, alpha_tokens=3_000_000)
    for r in requests:
        sched.submit(r)
    # Engines 0,1 on node 10 and 2,3 on node 11.
    loads = [EngineLoad(e, 10 + e // 2, 0, t) for e, t in enumerate(toks)]
    nodes = [NodeLoad(10, read_qs[0]), NodeLoad(11, read_qs[1])]
    picks = sched.fetch_prefill(0, loads, nodes)
    tok = dict(enumerate(toks))
    for pick in picks:
        eligible = {e: t for e, t in tok.items() if t <= 200_000}
        assert pick.pe in eligible  # never an engine above beta
        short = {e: t for e, t in eligible.items() if read_qs[e // 2] <= 3_000_000}
        pool = short or eligible
        assert tok[pick.pe] == min(pool.values())  # C2 first, lowest tok_e inside the class
        tok[pick.pe] += pick.request.total_tokens
    assert [p.request for p in picks] == requests[: len(picks)]  # global FIFO
    if len(picks) < len(requests):
        assert all(t > 200_000 for t in tok.values())  # it stopped only because every PE is above beta


@settings(max_examples=150, deadline=None)
@given(requests_st, st.lists(st.integers(0, 200_000), min_size=4, max_size=4),
       st.lists(st.integers(0, 300_000), min_size=4, max_size=4))
def test_hbm_admission_never_over_commits(requests, free, toks):
    sched = one_pe_one_de()
    for r in requests:
        sched.submit(r)
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, 0)])
    assignments = sched.fetch_decode(1, de_loads(free, toks), [NodeLoad(1, 0)])
    used = dict.fromkeys(range(100, 104), 0)
    for a in assignments:
        used[a.de] += a.request.hbm_tokens
    assert all(used[100 + i] <= free[i] for i in range(4))
    placed = [a.request for a in assignments]
    assert placed == requests[: len(placed)]  # private queue order
    if len(placed) < len(requests):
        head = requests[len(placed)]
        assert all(free[i] - used[100 + i] < head.hbm_tokens for i in range(4))


def test_decode_prefers_fewest_requests_below_z_then_fewest_tokens():
    sched = one_pe_one_de(de_engines=3)
    sched.submit(Request(1, 900, 100, 10))
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, 0)])
    # Z = 1.05 * (1000 + 3000 + 100 + 200) / 3 = 1505: DE 100 (tok 3000) is high, 101/102 are normal.
    loads = [EngineLoad(100, 1, 1, 3000, 10**6), EngineLoad(101, 1, 5, 100, 10**6), EngineLoad(102, 1, 2, 200, 10**6)]
    [a] = sched.fetch_decode(1, loads, [NodeLoad(1, 0)])
    assert a.de == 102  # fewest requests among normal DEs, although 101 has fewer tokens
    sched.submit(Request(2, 900, 100, 10))
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, 0)])
    loads = [EngineLoad(100, 1, 1, 3000, 10**6), EngineLoad(101, 1, 5, 2900, 10**6), EngineLoad(102, 1, 2, 200, 0)]
    [b] = sched.fetch_decode(1, loads, [NodeLoad(1, 0)])
    assert b.de == 101  # no normal DE has room: the high one with fewest tokens


@settings(max_examples=100, deadline=None)
@given(requests_st, st.integers(2, 6))
def test_decode_group_totals_stay_balanced(requests, n_groups):
    groups = [EngineGroup(0, "prefill", (0,))] + [EngineGroup(g, "decode", (100 + g,)) for g in range(1, n_groups + 1)]
    sched = GlobalScheduler(groups, SchedulerConfig(beta_tokens=10**9))
    for r in requests:
        sched.submit(r)
    assert len(sched.fetch_prefill(0, [EngineLoad(0, 0, 0, 0)], [])) == len(requests)
    sched.fetch_decode(1, [EngineLoad(101, 1, 0, 0, 0)], [])  # no HBM: everything stays queued
    totals = list(sched.decode_group_tokens().values())
    assert sum(totals) == sum(r.total_tokens for r in requests)
    assert max(totals) - min(totals) <= max(r.total_tokens for r in requests)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 100_000), st.integers(0, 10**7), st.integers(0, 10**7))
def test_read_side_follows_the_shorter_queue(hit, pe_q, de_q):
    sched = one_pe_one_de()
    sched.submit(Request(0, hit, 10, 1))
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, pe_q)])
    [a] = sched.fetch_decode(1, de_loads([10**6] * 4), [NodeLoad(1, de_q)])
    assert a.side is (ReadSide.PE if pe_q <= de_q else ReadSide.DE)
    assert (a.pe_read_tokens, a.de_read_tokens) == ((hit, 0) if pe_q <= de_q else (0, hit))


def test_read_side_charges_the_queue_it_picked():
    sched = one_pe_one_de()
    for i in range(4):
        sched.submit(Request(i, 1000, 10, 1))
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, 1500)])
    sides = [a.side for a in sched.fetch_decode(1, de_loads([10**6] * 4), [NodeLoad(1, 0)])]
    # DE queue 0 -> DE (1000) -> DE (2000 > 1500) -> PE (1500 <= 2000) ...
    assert sides == [ReadSide.DE, ReadSide.DE, ReadSide.PE, ReadSide.DE]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 200_000), st.lists(st.tuples(st.integers(0, 10**6), st.floats(1e3, 1e7)), min_size=1, max_size=4))
def test_split_reads_finish_together(hit, readers):
    queues, rates = [q for q, _ in readers], [r for _, r in readers]
    tokens = split_tokens(hit, queues, rates, 64)
    assert sum(tokens) == hit and min(tokens) >= 0
    left = hit
    for x in tokens[1:]:  # whole blocks, or all that is left, in order
        assert x % 64 == 0 or x == left
        left -= x
    # Every reader finishes within one block per reader of the slowest active one, and an idle reader's own
    # queue lasts at least as long (less the same rounding).
    slack = sum(64 / r for r in rates) + 1e-9
    finish = [(q + x) / r for q, x, r in zip(queues, tokens, rates, strict=True)]
    active = [f for f, x in zip(finish, tokens, strict=True) if x > 0]
    assert max(active) - min(active) <= slack
    assert all(f >= max(active) - slack for f, x in zip(finish, tokens, strict=True) if x == 0)


def test_a_split_read_takes_the_least_loaded_other_de_as_helper():
    sched = GlobalScheduler([EngineGroup(0, "prefill", (0,)), EngineGroup(1, "decode", (100, 101, 102))],
                            SchedulerConfig(read_policy="split", alpha_tokens=500))
    sched.submit(Request(0, 96_000, 100, 10))
    sched.fetch_prefill(0, [EngineLoad(0, 0, 0, 0)], [NodeLoad(0, 0, 1000.0)])
    # DE 100 holds the fewest tokens and gets the decode; of the others, node 3 drains before node 2.
    loads = [EngineLoad(100, 1, 0, 0, 10**6),
             EngineLoad(101, 2, 5, 50_000, 10**6), EngineLoad(102, 3, 5, 50_000, 10**6)]
    nodes = [NodeLoad(1, 0, 1000.0), NodeLoad(2, 40_000, 1000.0), NodeLoad(3, 10_000, 1000.0)]
    [a] = sched.fetch_decode(1, loads, nodes)
    assert (a.de, a.helper, a.side) == (100, 102, ReadSide.SPLIT)
    # Three readers at 1000 tokens/s finish together: level (96,000 + 10,000) / 3 s, rounded to blocks.
    assert abs(a.de_read_tokens - 35_333) <= 32 and abs(a.helper_read_tokens - 25_333) <= 32
    assert a.pe_read_tokens + a.de_read_tokens + a.helper_read_tokens == 96_000

    sched.submit(Request(1, 1_000, 100, 10))  # a small read, and every other DE's queue outlasts both sides'
    sched.fetch_prefill(0, [EngineLoad(0, 0, 0, 0)], [])
    [b] = sched.fetch_decode(1, loads, [NodeLoad(2, 40_000, 1000.0), NodeLoad(3, 90_000, 1000.0)])
    assert b.helper == -1 and b.helper_read_tokens == 0 and b.pe_read_tokens + b.de_read_tokens == 1_000


@pytest.mark.parametrize(("gpu_rate", "pe_queue", "de_queue", "pe_tokens"), [
    (500, 0, 0, 64_000),  # reads of 64 s before 128 s of compute: whole on the PE, no DE work
    (500, 40_000, 0, 64_000),  # 104 s of reads, still within the compute
    (2_000, 0, 0, 32_000),  # 64 s of reads for 32 s of compute: both queues drain together
    (500, 80_000, 100_000, 42_000),  # not short (beyond alpha): (80,000 + 100,000 + 64,000) / 2 each
])
def test_split_policy_keeps_a_hit_whole_on_the_pe_only_where_reads_are_not_its_bottleneck(
        gpu_rate, pe_queue, de_queue, pe_tokens):
    sched = one_pe_one_de(read_policy="split", alpha_tokens=128_000, beta_tokens=5 * gpu_rate)
    sched.submit(Request(0, 64_000, 100, 10))
    sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [NodeLoad(0, pe_queue, 1000.0)])
    [a] = sched.fetch_decode(1, de_loads([10**6] * 4), [NodeLoad(1, de_queue, 1000.0)])
    assert a.pe_read_tokens + a.de_read_tokens == 64_000
    if pe_tokens == 64_000:
        assert a.side is ReadSide.PE and a.de_read_tokens == 0
    else:  # both queues drain together, the PE's part in whole blocks
        assert a.side is ReadSide.SPLIT and abs(a.pe_read_tokens - pe_tokens) < 64 and a.pe_read_tokens % 64 == 0


def test_every_mode_is_a_valid_config_and_unknown_names_list_the_choices():
    assert [name for name, mode in MODES.items() if mode.router] == ["baseline", "dualpath", "split"]
    for mode in MODES.values():
        assert mode.scheduler_config(SchedulerConfig(seed=3)).read_policy in READ_POLICIES
    with pytest.raises(ValueError, match="choose from basic, layerwise"):
        get_mode("dualpath-split")
    with pytest.raises(ValueError, match="choose from queue, pe_only, round_robin, split"):
        SchedulerConfig(read_policy="fast")


def test_decisions_are_deterministic_and_ties_follow_the_seed():
    def first_pick(seed: int) -> int:
        sched = one_pe_one_de(pe_engines=8, seed=seed)
        sched.submit(Request(0, 10, 10, 1))
        return sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(8)], [])[0].pe

    assert first_pick(3) == first_pick(3)
    assert len({first_pick(seed) for seed in range(16)}) > 1


def test_round_robin_cycles_engines_and_sides():
    sched = one_pe_one_de(placement="round_robin", read_policy="round_robin")
    for i in range(6):
        sched.submit(Request(i, 100, 10, 1))
    picks = sched.fetch_prefill(0, [EngineLoad(e, 0, 0, 0) for e in range(4)], [])
    assert [p.pe for p in picks] == [0, 1, 2, 3, 0, 1]
    assignments = sched.fetch_decode(1, de_loads([10**6] * 4), [])
    assert [a.de for a in assignments] == [100, 101, 102, 103, 100, 101]
    assert [a.side for a in assignments][:2] == [ReadSide.PE, ReadSide.DE]


def test_bad_reports_raise_and_leave_the_queue_intact():
    sched = one_pe_one_de()
    sched.submit(Request(0, 10, 10, 1))
    with pytest.raises(ValueError, match="unknown engine group 7"):
        sched.fetch_prefill(7, [], [])
    with pytest.raises(ValueError, match="decode group"):
        sched.fetch_prefill(1, de_loads([1] * 4), [])
    with pytest.raises(ValueError, match="each of its engines"):
        sched.fetch_prefill(0, [EngineLoad(0, 0, 0, 0)], [])
    assert sched.waiting_prefill == 1
    with pytest.raises(ValueError, match="new_tokens"):
        Request(1, 10, 0, 1)
    with pytest.raises(ValueError, match="z_factor"):
        SchedulerConfig(z_factor=0.9)
    with pytest.raises(ValueError, match="duplicate"):
        GlobalScheduler([EngineGroup(0, "prefill", (0,)), EngineGroup(0, "decode", (1,))])


def test_profiled_thresholds_follow_the_paper_definitions():
    cfg = SchedulerConfig.profiled(read_tokens_per_s=1e6, gpu_tokens_per_s=5e4)
    assert (cfg.alpha_tokens, cfg.beta_tokens) == (3_000_000, 250_000)
