"""Reproduces the paper's evaluation figures in the simulator and prints our numbers beside the paper's.

Figures: offline DS 660B 2P4D 64K (Fig. 7: up to 1.87x over Basic, close to Oracle), the DS 27B P/D sweep
(Fig. 8: average 1.64x, max 2.46x), the append and generation length sweep (Fig. 9: DualPath 1.82-1.99x
Basic across append scales), online agents/s at SLO (Fig. 10: 1.67x DS 27B, 2.25x DS 660B), trajectory JCT
against agents/s (Fig. 11: DS 660B ~575 s at 0.1, ~1,100 s at 0.45), the ablation (Fig. 12: -17.21%,
-38.19%, -45.62% JCT), storage-NIC max/avg (Fig. 13: 1.53 -> 1.18) and Table 3's online rows (2P4D at 0.4
agents/s: TTFT 1.739 s, TPOT 0.039 s; 44P88D at 8.8), plus how much further split reads go. "baseline" is
Basic measured in the same run (the paper's value for Table 3).

    .venv/bin/python benchmark/sim_reproduce.py [--quick] [--only fig9,fig11,table3] [--out DIR]

Writes sim_reproduce.json (a record per measured point), sim_reproduce.md (the same records as a table)
and sim_*.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path

from dualpath.sim import (
    ClusterSpec,
    RunResult,
    build_workload,
    capacity_at_slo,
    get_mode,
    get_model,
    meets_slo,
    run_offline,
    run_online,
)
from dualpath.sim.plots import bar_chart, line_chart, online_chart
from dualpath.traces import AgentTrace

RESULTS = Path(__file__).resolve().parent / "results"
RECORDS: list[dict] = []


def record(metric: str, value: float, unit: str, baseline: str, baseline_value: float, paper: str, *,
           setting: str, mode: str) -> None:
    RECORDS.append({
        "metric": metric, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
        "ratio": value / baseline_value if baseline_value else None, "target": paper,
        "command": "python " + " ".join(["benchmark/sim_reproduce.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "date": datetime.now(UTC).date().isoformat(), "setting": setting, "mode": mode})


def compare(label: str, ours: float, paper: float) -> None:
    diff = (ours - paper) / paper * 100
    flag = "" if abs(diff) <= 15 else "  <-- differs by more than 15%, see docs/simulator.md"
    print(f"  {label:<58} ours {ours:7.3f}   paper {paper:7.3f}   ({diff:+.0f}%){flag}", flush=True)


def offline(model: str, pd: tuple[int, int], mode: str, workload: str, agents: int,
            lengths: tuple[float, float] = (1.0, 1.0)) -> RunResult:
    """`lengths`: every turn's append and generation scale (Fig. 9)."""
    spec = ClusterSpec(*pd, get_model(model), get_mode(mode))
    traces = build_workload(workload, agents, append_scale=lengths[0], gen_scale=lengths[1])
    result = run_offline(spec, traces, f"{model} {pd[0]}P{pd[1]}D {agents}")
    scaled = "" if lengths == (1.0, 1.0) else f" append x{lengths[0]:g} gen x{lengths[1]:g}"
    print(f"    {model} {pd[0]}P{pd[1]}D {workload}{scaled} {agents:>5} agents {mode:<15} JCT "
          f"{result.makespan_s:8,.0f} s TTFT {result.mean_ttft_s:6.2f} s  wall {result.wall_s:5.1f} s", flush=True)
    return result


@cache
def online_pool() -> list[AgentTrace]:
    return build_workload("synthetic-64k", 500)


@cache  # Fig. 11 and Table 3 read the same runs
def online(model: str, pd: tuple[int, int], mode: str, aps: float, duration: float) -> RunResult:
    spec = ClusterSpec(*pd, get_model(model), get_mode(mode))
    r = run_online(spec, online_pool(), aps, duration, duration / 2, f"{model} {pd[0]}P{pd[1]}D online")
    slo = "" if meets_slo(r) else "  over the SLO"
    print(f"    {model} {pd[0]}P{pd[1]}D {mode:<15} {aps:6.3f} agents/s: TTFT {r.mean_ttft_s:8.2f} s  "
          f"TPOT {r.mean_tpot_s * 1e3:5.1f} ms  wall {r.wall_s:5.1f} s{slo}", flush=True)
    return r


def throughput(result: RunResult) -> float:
    return result.agents / result.makespan_s * 3600


def fig7(out: Path, counts: list[int]) -> None:
    print("Fig. 7  offline DS 660B 2P4D, 64K MAL", flush=True)
    speedups, splits, labels, ours, paper = [], [], [], [], []
    paper_basic = {512: 2900, 2048: 10100, 4096: 19500}
    for n in counts:
        modes = ("basic", "dualpath", "split", "oracle")
        runs = {m: offline("ds660b", (2, 4), m, "synthetic-64k", n) for m in modes}
        basic = runs["basic"]
        for mode in ("dualpath", "split", "oracle"):
            record(f"offline_ds660b_2p4d_64k_{n}_agents_{mode}", throughput(runs[mode]), "agents/h",
                   "Basic, same run", throughput(basic), "paper: DualPath up to 1.87x Basic, close to Oracle",
                   setting=f"ds660b 2P4D 64K, {n} agents", mode=mode)
        speedups.append(throughput(runs["dualpath"]) / throughput(basic))
        splits.append(throughput(runs["split"]) / throughput(runs["dualpath"]))
        of_oracle = runs["oracle"].makespan_s / runs["dualpath"].makespan_s
        print(f"    -> DualPath {speedups[-1]:.2f}x Basic, {of_oracle:.2f} of Oracle's speed; "
              f"split reads {splits[-1]:.3f}x DualPath", flush=True)
        for mode in ("basic", "dualpath", "oracle"):
            labels.append(f"{mode} {n}")
            ours.append(runs[mode].makespan_s)
            paper.append(paper_basic.get(n) if mode == "basic" else None)
    compare("DS 660B max offline speed-up over Basic", max(speedups), 1.87)
    bar_chart(out / "sim_fig7_offline_ds660b.png", "Offline JCT, DS 660B 2P4D 64K", labels, ours, "JCT (s)", paper)


def fig8(out: Path, counts: list[int]) -> None:
    print("Fig. 8  DS 27B P/D sweep, 64K MAL", flush=True)
    speedups, labels, values = [], [], []
    for pd in ((1, 1), (2, 1), (1, 2)):
        for n in counts:
            basic = offline("ds27b", pd, "basic", "synthetic-64k", n)
            dual = offline("ds27b", pd, "dualpath", "synthetic-64k", n)
            split = offline("ds27b", pd, "split", "synthetic-64k", n)
            oracle = offline("ds27b", pd, "oracle", "synthetic-64k", n)
            name = f"{pd[0]}P{pd[1]}D"
            for mode, run in (("dualpath", dual), ("split", split), ("oracle", oracle)):
                record(f"offline_ds27b_{name.lower()}_64k_{n}_agents_{mode}", throughput(run), "agents/h",
                       "Basic, same run", throughput(basic), "paper: average 1.64x, max 2.46x (1P2D)",
                       setting=f"ds27b {name} 64K, {n} agents", mode=mode)
            speedups.append(throughput(dual) / throughput(basic))
            labels.append(f"{name} {n}")
            values.append(speedups[-1])
            split_gain = throughput(split) / throughput(dual)
            print(f"    -> {name} {n}: DualPath {speedups[-1]:.2f}x Basic, split {split_gain:.3f}x DualPath, "
                  f"DualPath {dual.makespan_s / oracle.makespan_s:.2f}x slower than Oracle", flush=True)
    compare("DS 27B P/D sweep average speed-up", statistics.fmean(speedups), 1.64)
    compare("DS 27B P/D sweep max speed-up", max(speedups), 2.46)
    bar_chart(out / "sim_fig8_pd_sweep_ds27b.png", "DS 27B speed-up over Basic", labels, values, "x Basic")


def fig9(out: Path, agents: int, scales: Sequence[float]) -> None:
    print(f"Fig. 9  append / generation length sweep, DS 660B 2P4D 64K MAL, {agents} agents", flush=True)
    modes = ("basic", "dualpath", "oracle")
    axes = {"append": [(s, 1.0) for s in scales], "generation": [(1.0, s) for s in scales]}
    # Scale 1 is the same workload on both axes: run it once.
    runs = {lengths: {m: offline("ds660b", (2, 4), m, "synthetic-64k", agents, lengths) for m in modes}
            for lengths in dict.fromkeys(axes["append"] + axes["generation"])}
    for (append, gen), by_mode in runs.items():
        basic = by_mode["basic"].makespan_s
        paper = ("paper: DualPath 1.82-1.99x Basic's speed across append scales (JCT x0.50-0.55 of Basic)"
                 if gen == 1.0 else "paper: the trend of the append sweep, no numbers")
        for mode in ("dualpath", "oracle"):
            record(f"lengths_ds660b_2p4d_64k_{agents}_agents_append_x{append:g}_gen_x{gen:g}_{mode}_jct",
                   by_mode[mode].makespan_s, "s", "Basic, same run", basic, paper,
                   setting=f"ds660b 2P4D 64K, {agents} agents, append x{append:g}, generation x{gen:g}", mode=mode)
        print(f"    -> append x{append:g} gen x{gen:g}: DualPath {basic / by_mode['dualpath'].makespan_s:.2f}x "
              f"Basic, Oracle {basic / by_mode['oracle'].makespan_s:.2f}x Basic", flush=True)
    speedups = [runs[p]["basic"].makespan_s / runs[p]["dualpath"].makespan_s for p in axes["append"]]
    compare("DualPath over Basic, smallest across append scales", min(speedups), 1.82)
    compare("DualPath over Basic, largest across append scales", max(speedups), 1.99)
    panels = {f"{axis} length scale": {m: (scales, [runs[p][m].makespan_s for p in points]) for m in modes}
              for axis, points in axes.items()}
    line_chart(out / "sim_fig9_lengths.png", f"Offline JCT, DS 660B 2P4D 64K MAL, {agents} agents", panels,
               "JCT (s)", logx=True)


def fig10(out: Path, model: str, pd: tuple[int, int], paper: float, aps_range: tuple[float, float], duration: float,
          steps: int) -> None:
    print(f"Fig. 10  online {model} {pd[0]}P{pd[1]}D: max agents/s with TTFT <= 4 s and TPOT <= 50 ms", flush=True)
    capacity, sweeps, rates = {}, {}, {}
    for mode in ("basic", "dualpath", "split"):
        tried: list[float] = []

        def point(aps: float, mode: str = mode, tried: list[float] = tried) -> RunResult:
            tried.append(aps)
            return online(model, pd, mode, aps, duration)

        capacity[mode], sweeps[mode] = capacity_at_slo(point, *aps_range, steps=steps)
        rates[mode] = tried
    for mode in ("dualpath", "split"):
        record(f"online_{model}_{pd[0]}p{pd[1]}d_capacity_{mode}", capacity[mode], "agents/s", "Basic, same run",
               capacity["basic"], f"paper: {paper}x Basic", setting=f"{model} {pd[0]}P{pd[1]}D online, 64K",
               mode=mode)
    print(f"    capacities: {', '.join(f'{m} {c:.3f}' for m, c in capacity.items())} agents/s", flush=True)
    compare(f"{model} online capacity over Basic", capacity["dualpath"] / capacity["basic"], paper)
    online_chart(out / f"sim_fig10_online_{model}.png", sweeps, rates)


FIG11_PAPER = {0.1: 575.0, 0.45: 1100.0}  # DualPath's mean trajectory JCT (s), read off Fig. 11


def fig11(out: Path, rates: Sequence[float], duration: float) -> None:
    print("Fig. 11  online DS 660B 2P4D: mean trajectory JCT against agents/s", flush=True)
    modes = ("basic", "dualpath")
    runs = {m: [online("ds660b", (2, 4), m, aps, duration) for aps in rates] for m in modes}
    # Little's law over the run's second half; over capacity (no steady state) it grows with the run.
    jct = {m: [r.mean_trajectory_jct_s for r in results] for m, results in runs.items()}
    for aps, basic, basic_jct, dual_jct in zip(rates, runs["basic"], jct["basic"], jct["dualpath"], strict=True):
        reading = FIG11_PAPER.get(aps)
        over = "" if meets_slo(basic) else " (over its SLO: no steady state)"
        record(f"online_ds660b_2p4d_{aps:g}_aps_trajectory_jct_dualpath", dual_jct, "s", f"Basic, same run{over}",
               basic_jct,
               f"paper: ~{reading:,.0f} s (Fig. 11 reading)" if reading else "paper: no reading at this rate",
               setting=f"ds660b 2P4D online, 64K, {aps:g} agents/s", mode="dualpath")
    for aps, reading in FIG11_PAPER.items():
        if aps in rates:
            compare(f"DualPath mean trajectory JCT at {aps:g} agents/s (s)", jct["dualpath"][rates.index(aps)],
                    reading)
    line_chart(out / "sim_fig11_jct_vs_aps.png", "Online DS 660B 2P4D, 64K: mean trajectory JCT",
               {"agents per second": {m: (rates, jct[m]) for m in modes}}, "trajectory JCT (s)",
               {"paper DualPath (read off Fig. 11)": (list(FIG11_PAPER), list(FIG11_PAPER.values()))})


# DualPath's TTFT, TTST and TPOT (s) in Table 3, by P/D shape and agents/s.
TABLE3_ONLINE = {((2, 4), 0.4): (1.739, 0.228, 0.039), ((44, 88), 8.8): (1.847, 0.194, 0.036)}


def table3(rows: Sequence[tuple[tuple[int, int], float]], duration: float) -> None:
    print("Table 3  online DS 660B, DualPath: TTFT and TPOT against the paper's", flush=True)
    for pd, aps in rows:
        ttft, ttst, tpot = TABLE3_ONLINE[pd, aps]
        r = online("ds660b", pd, "dualpath", aps, duration)
        setting = f"ds660b {pd[0]}P{pd[1]}D online, 64K, {aps:g} agents/s"
        for name, ours, paper in (("ttft", r.mean_ttft_s, ttft), ("tpot", r.mean_tpot_s, tpot)):
            record(f"online_ds660b_{pd[0]}p{pd[1]}d_{aps:g}_aps_{name}_dualpath", ours, "s", "paper, Table 3", paper,
                   f"paper: {name.upper()} {paper} s", setting=setting, mode="dualpath")
            compare(f"{pd[0]}P{pd[1]}D {aps:g} agents/s mean {name.upper()} (s)", ours, paper)
        # The simulated first token is the DE's first decode step, after the PE -> DE handoff that the paper's
        # TTST (second token) carries; there is no separate second token to time.
        print(f"    TTST (paper {ttst} s): not simulated; our TTFT includes the PE -> DE handoff "
              f"(paper TTFT + TTST = {ttft + ttst:.3f} s)", flush=True)


def fig12_13(out: Path, counts: list[int]) -> None:
    print("Fig. 12/13  ablation and storage-NIC balance, DS 660B 2P4D 64K", flush=True)
    steps = ("basic", "layerwise", "dualpath-rr", "dualpath")
    paper = {"layerwise": 0.8279, "dualpath-rr": 0.6181, "dualpath": 0.5438}
    reductions: dict[str, list[float]] = {s: [] for s in steps[1:]}
    balance = {"dualpath-rr": [], "dualpath": []}
    for n in counts:
        runs = {s: offline("ds660b", (2, 4), s, "synthetic-64k", n) for s in steps}
        for s in steps[1:]:
            reductions[s].append(runs[s].makespan_s / runs["basic"].makespan_s)
            record(f"ablation_ds660b_{n}_agents_{s}_jct", runs[s].makespan_s, "s", "Basic, same run",
                   runs["basic"].makespan_s, f"paper: JCT x{paper[s]:.3f} of Basic (average of 1024 and 2048 agents)",
                   setting=f"ds660b 2P4D 64K, {n} agents, ablation", mode=s)
        for s in balance:
            balance[s].append(runs[s].snic_max_over_avg)
    for s in steps[1:]:
        compare(f"ablation + {s}: JCT relative to Basic", statistics.fmean(reductions[s]), paper[s])
    rr, ours = statistics.fmean(balance["dualpath-rr"]), statistics.fmean(balance["dualpath"])
    counted = " and ".join(map(str, counts))
    record("snic_max_over_avg_dualpath_scheduler", ours, "max/avg", "round-robin scheduler (dual path), same run",
           rr, "paper: 1.18 vs 1.53 (ratio 0.77)",
           setting=f"ds660b 2P4D 64K, storage-NIC max/avg (Fig. 13), mean of {counted} agents", mode="dualpath")
    compare("storage NIC max/avg, round robin", rr, 1.53)
    compare("storage NIC max/avg, DualPath scheduler", ours, 1.18)
    bar_chart(out / "sim_fig12_ablation.png", "Ablation: JCT relative to Basic", list(steps[1:]),
              [statistics.fmean(reductions[s]) for s in steps[1:]], "JCT / Basic JCT", [paper[s] for s in steps[1:]])


def plan(quick: bool, out: Path) -> list[tuple[str, Callable[[], None]]]:
    """(figure, run) in the order they run; --only picks by figure."""
    if quick:
        return [
            ("fig7", partial(fig7, out, [256])),
            ("fig8", partial(fig8, out, [100])),
            ("fig12", partial(fig12_13, out, [256])),
            ("fig10", partial(fig10, out, "ds27b", (1, 1), 1.67, (0.05, 4.0), 900.0, 4)),
            ("fig9", partial(fig9, out, 256, (1.0, 2.0))),
            ("fig11", partial(fig11, out, (0.1, 0.4), 900.0)),
            ("table3", partial(table3, [((2, 4), 0.4)], 900.0)),
        ]
    return [
        ("fig7", partial(fig7, out, [512, 1024, 2048])),
        ("fig8", partial(fig8, out, [100, 200, 400])),
        ("fig12", partial(fig12_13, out, [1024, 2048])),
        ("fig10", partial(fig10, out, "ds27b", (1, 1), 1.67, (0.05, 4.0), 1800.0, 6)),
        ("fig10", partial(fig10, out, "ds660b", (2, 4), 2.25, (0.05, 1.5), 1800.0, 6)),
        ("fig9", partial(fig9, out, 1024, (0.5, 1.0, 2.0, 4.0))),
        ("fig11", partial(fig11, out, (0.1, 0.2, 0.3, 0.4, 0.45), 1800.0)),
        ("table3", partial(table3, list(TABLE3_ONLINE), 1800.0)),
    ]


def number(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def markdown(records: Sequence[dict]) -> str:
    """The records as one table row each (docs/simulator.md points here); each record in the json also
    carries its command, machine and date."""
    rows = [f"| {r['figure']} | {r['setting']} | {r['mode']} | {number(r['value'])} | {r['unit']} | "
            f"{r['baseline']} | {number(r['baseline_value'])} | {number(r['ratio'])} | "
            f"{r['target'].removeprefix('paper: ')} |" for r in records]
    return "\n".join([
        "# Simulated paper figures (`benchmark/sim_reproduce.py`)", "",
        "One row per record of `sim_reproduce.json`; ratio = value / baseline value (agents/h: speed-up, "
        "s: fraction of the baseline's time).", "",
        "| figure | setting | mode | value | unit | baseline | baseline value | ratio | paper |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])


def save(out: Path, ran: set[str]) -> None:
    """Records of figures not run this time (--only) stay as the json had them; records written before
    records named their figure cannot be told apart and are dropped."""
    path = out / "sim_reproduce.json"
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in old if "figure" in r and r["figure"] not in ran]
    records = kept + RECORDS
    path.write_text(json.dumps(records, indent=2) + "\n")
    (out / "sim_reproduce.md").write_text(markdown(records))
    print(f"wrote {path}, sim_reproduce.md and sim_*.png in {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller agent counts and searches (a smoke run)")
    figures = list(dict.fromkeys(name for name, _ in plan(False, RESULTS)))
    parser.add_argument("--only", type=lambda s: s.split(","), default=figures,
                        help=f"comma-separated figures to run, of {','.join(figures)} (default: all); the "
                             "other figures' records in the json are kept")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the json, md and plots")
    args = parser.parse_args()
    if unknown := set(args.only) - set(figures):
        parser.error(f"unknown figures {', '.join(sorted(unknown))}; choose from {','.join(figures)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in plan(args.quick, args.out):
        if name in args.only:
            start, wall = len(RECORDS), time.perf_counter()
            run()
            for r in RECORDS[start:]:
                r["figure"] = name
            print(f"  ({name}: {time.perf_counter() - wall:.0f} s wall)", flush=True)
    save(args.out, set(args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
