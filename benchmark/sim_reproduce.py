"""Reproduces the paper's evaluation figures in the simulator and prints our numbers beside the paper's.

Figures: offline DS 660B 2P4D 64K (Fig. 7: up to 1.87x over Basic, close to Oracle), the DS 27B P/D sweep
(Fig. 8: average 1.64x, max 2.46x), online agents/s at SLO (Fig. 10: 1.67x DS 27B, 2.25x DS 660B), the
ablation (Fig. 12: -17.21%, -38.19%, -45.62% JCT) and storage-NIC max/avg (Fig. 13: 1.53 -> 1.18), plus
how much further split reads go. "baseline" is Basic measured in the same run.

    .venv/bin/python benchmark/sim_reproduce.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

from dualpath.sim import ClusterSpec, RunResult, build_workload, capacity_at_slo, get_mode, get_model, run_offline
from dualpath.sim.plots import bar_chart, online_chart
from dualpath.sim.runner import run_online

RESULTS = Path(__file__).resolve().parent / "results"
RECORDS: list[dict] = []


def record(metric: str, value: float, unit: str, baseline: str, baseline_value: float, paper: str) -> None:
    RECORDS.append({
        "metric": metric, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
        "ratio": value / baseline_value if baseline_value else None, "target": paper,
        "command": "python " + " ".join(["benchmark/sim_reproduce.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "date": datetime.now(UTC).date().isoformat()})


def compare(label: str, ours: float, paper: float) -> None:
    diff = (ours - paper) / paper * 100
    flag = "" if abs(diff) <= 15 else "  <-- differs by more than 15%, see docs/simulator.md"
    print(f"  {label:<58} ours {ours:7.3f}   paper {paper:7.3f}   ({diff:+.0f}%){flag}", flush=True)


def offline(model: str, pd: tuple[int, int], mode: str, workload: str, agents: int) -> RunResult:
    spec = ClusterSpec(*pd, get_model(model), get_mode(mode))
    result = run_offline(spec, build_workload(workload, agents), f"{model} {pd[0]}P{pd[1]}D {agents}")
    print(f"    {model} {pd[0]}P{pd[1]}D {workload} {agents:>5} agents {mode:<15} JCT {result.makespan_s:8,.0f} s "
          f"TTFT {result.mean_ttft_s:6.2f} s  wall {result.wall_s:5.1f} s", flush=True)
    return result


def throughput(result: RunResult) -> float:
    return result.agents / result.makespan_s * 3600


def fig7(counts: list[int]) -> None:
    print("Fig. 7  offline DS 660B 2P4D, 64K MAL", flush=True)
    speedups, splits, labels, ours, paper = [], [], [], [], []
    paper_basic = {512: 2900, 2048: 10100, 4096: 19500}
    for n in counts:
        modes = ("basic", "dualpath", "split", "oracle")
        runs = {m: offline("ds660b", (2, 4), m, "synthetic-64k", n) for m in modes}
        basic = runs["basic"]
        for mode in ("dualpath", "split", "oracle"):
            record(f"offline_ds660b_2p4d_64k_{n}_agents_{mode}", throughput(runs[mode]), "agents/h",
                   "Basic, same run", throughput(basic), "paper: DualPath up to 1.87x Basic, close to Oracle")
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
    bar_chart(RESULTS / "sim_fig7_offline_ds660b.png", "Offline JCT, DS 660B 2P4D 64K", labels, ours, "JCT (s)", paper)


def fig8(counts: list[int]) -> None:
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
                       "Basic, same run", throughput(basic), "paper: average 1.64x, max 2.46x (1P2D)")
            speedups.append(throughput(dual) / throughput(basic))
            labels.append(f"{name} {n}")
            values.append(speedups[-1])
            split_gain = throughput(split) / throughput(dual)
            print(f"    -> {name} {n}: DualPath {speedups[-1]:.2f}x Basic, split {split_gain:.3f}x DualPath, "
                  f"DualPath {dual.makespan_s / oracle.makespan_s:.2f}x slower than Oracle", flush=True)
    compare("DS 27B P/D sweep average speed-up", statistics.fmean(speedups), 1.64)
    compare("DS 27B P/D sweep max speed-up", max(speedups), 2.46)
    bar_chart(RESULTS / "sim_fig8_pd_sweep_ds27b.png", "DS 27B speed-up over Basic", labels, values, "x Basic")


def fig10(model: str, pd: tuple[int, int], paper: float, aps_range: tuple[float, float], duration: float,
          steps: int) -> None:
    print(f"Fig. 10  online {model} {pd[0]}P{pd[1]}D: max agents/s with TTFT <= 4 s and TPOT <= 50 ms", flush=True)
    pool = build_workload("synthetic-64k", 500)
    capacity, sweeps, rates = {}, {}, {}
    for mode in ("basic", "dualpath", "split"):
        spec = ClusterSpec(*pd, get_model(model), get_mode(mode))
        tried: list[float] = []

        def point(aps: float, spec: ClusterSpec = spec, tried: list[float] = tried) -> RunResult:
            tried.append(aps)
            r = run_online(spec, pool, aps, duration, duration / 2, f"{model} online")
            print(f"    {spec.mode.name:<15} {aps:6.3f} agents/s: TTFT {r.mean_ttft_s:8.2f} s  "
                  f"TPOT {r.mean_tpot_s * 1e3:5.1f} ms  wall {r.wall_s:5.1f} s", flush=True)
            return r

        capacity[mode], sweeps[mode] = capacity_at_slo(point, *aps_range, steps=steps)
        rates[mode] = tried
    for mode in ("dualpath", "split"):
        record(f"online_{model}_{pd[0]}p{pd[1]}d_capacity_{mode}", capacity[mode], "agents/s", "Basic, same run",
               capacity["basic"], f"paper: {paper}x Basic")
    print(f"    capacities: {', '.join(f'{m} {c:.3f}' for m, c in capacity.items())} agents/s", flush=True)
    compare(f"{model} online capacity over Basic", capacity["dualpath"] / capacity["basic"], paper)
    online_chart(RESULTS / f"sim_fig10_online_{model}.png", sweeps, rates)


def fig12_13(counts: list[int]) -> None:
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
                   runs["basic"].makespan_s, f"paper: JCT x{paper[s]:.3f} of Basic (average of 1024 and 2048 agents)")
        for s in balance:
            balance[s].append(runs[s].snic_max_over_avg)
    for s in steps[1:]:
        compare(f"ablation + {s}: JCT relative to Basic", statistics.fmean(reductions[s]), paper[s])
    rr, ours = statistics.fmean(balance["dualpath-rr"]), statistics.fmean(balance["dualpath"])
    record("snic_max_over_avg_dualpath_scheduler", ours, "max/avg", "round-robin scheduler (dual path), same run",
           rr, "paper: 1.18 vs 1.53 (ratio 0.77)")
    compare("storage NIC max/avg, round robin", rr, 1.53)
    compare("storage NIC max/avg, DualPath scheduler", ours, 1.18)
    bar_chart(RESULTS / "sim_fig12_ablation.png", "Ablation: JCT relative to Basic", list(steps[1:]),
              [statistics.fmean(reductions[s]) for s in steps[1:]], "JCT / Basic JCT", [paper[s] for s in steps[1:]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller agent counts and searches (a smoke run)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.quick:
        fig7([256])
        fig8([100])
        fig12_13([256])
        fig10("ds27b", (1, 1), 1.67, (0.05, 4.0), 900.0, 4)
    else:
        fig7([512, 1024, 2048])
        fig8([100, 200, 400])
        fig12_13([1024, 2048])
        fig10("ds27b", (1, 1), 1.67, (0.05, 4.0), 1800.0, 6)
        fig10("ds660b", (2, 4), 2.25, (0.05, 1.5), 1800.0, 6)
    (RESULTS / "sim_reproduce.json").write_text(json.dumps(RECORDS, indent=2) + "\n")
    print(f"wrote {RESULTS / 'sim_reproduce.json'} and sim_*.png in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
