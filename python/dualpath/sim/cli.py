"""`dualpath simulate`: run simulated PD clusters offline (JCT) or online (agents/s at SLO) and plot them."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dualpath.scheduler.modes import MODES, Mode, get_mode
from dualpath.sim.cluster import ClusterSpec
from dualpath.sim.hardware import MODELS, HardwareSpec, ModelSpec, get_model
from dualpath.sim.plots import offline_chart, online_chart
from dualpath.sim.runner import RunResult, capacity_at_slo, run_offline, run_online
from dualpath.sim.workloads import WORKLOADS, build_workload, parse_pd


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("simulate", help=__doc__.splitlines()[0], description=__doc__)
    parser.add_argument("--model", choices=sorted(MODELS), default="ds660b")
    parser.add_argument("--pd", default="2P4D", help="prefill and decode node counts, e.g. 2P4D")
    parser.add_argument("--workload", choices=WORKLOADS, default="synthetic-64k")
    parser.add_argument("--agents", type=int, default=512, help="offline: agents started together")
    parser.add_argument("--modes", default="basic,dualpath,oracle",
                        help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--online", action="store_true", help="find the max agents/s meeting the SLO")
    parser.add_argument("--aps-range", default="0.05,2.0", help="online: low,high agents/s for the search")
    parser.add_argument("--duration", type=float, default=1800.0, help="online: simulated seconds per point")
    parser.add_argument("--storage-efficiency", type=float, default=HardwareSpec().storage_efficiency)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("sim-results"), help="folder for results.json and plots")
    parser.set_defaults(run=run)


def _table(results: list[RunResult], baseline: RunResult | None) -> Table:
    table = Table(title=f"simulated runs: {results[0].setting}")
    for column in ("mode", "agents", "requests", "JCT s", "vs first", "TTFT s", "TPOT ms",
                   "SNIC max/avg", "wall s"):
        table.add_column(column, justify="right")
    for r in results:
        speedup = f"{baseline.makespan_s / r.makespan_s:.2f}x" if baseline and r.makespan_s else "-"
        table.add_row(r.mode, str(r.agents), str(r.requests), f"{r.makespan_s:,.0f}", speedup,
                      f"{r.mean_ttft_s:.2f}", f"{r.mean_tpot_s * 1e3:.1f}", f"{r.snic_max_over_avg:.2f}",
                      f"{r.wall_s:.1f}")
    return table


def run(args: argparse.Namespace) -> int:
    console = Console()
    prefill, decode = parse_pd(args.pd)
    model = get_model(args.model)
    modes = [get_mode(name.strip()) for name in args.modes.split(",") if name.strip()]
    hardware = HardwareSpec(storage_efficiency=args.storage_efficiency)
    setting = f"{args.model} {args.pd} {args.workload}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.online:
        return _run_online(args, console, prefill, decode, model, modes, hardware, setting)
    agents = build_workload(args.workload, args.agents, args.seed)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[clock]}"),
                  TimeElapsedColumn(), console=console) as progress:
        for mode in modes:
            task = progress.add_task(mode.name, total=None, clock="t=0 s")
            spec = ClusterSpec(prefill, decode, model, mode, hardware, seed=args.seed)
            result = run_offline(spec, agents, setting,
                                 progress=lambda now, task=task: progress.update(task, clock=f"t={now:,.0f} s"))
            progress.update(task, total=1, completed=1, clock=f"JCT {result.makespan_s:,.0f} s")
            results.append(result)
    console.print(_table(results, results[0]))
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    chart = offline_chart(args.out / "offline_jct.png", results)
    console.print(f"wrote {args.out / 'results.json'} and {chart}")
    return 0


def _run_online(args: argparse.Namespace, console: Console, prefill: int, decode: int, model: ModelSpec,
                modes: list[Mode], hardware: HardwareSpec, setting: str) -> int:
    low, high = (float(v) for v in args.aps_range.split(","))
    pool = build_workload(args.workload, 500, args.seed)
    sweeps: dict[str, list[RunResult]] = {}
    rates: dict[str, list[float]] = {}
    capacities: dict[str, float] = {}
    for mode in modes:
        spec = ClusterSpec(prefill, decode, model, mode, hardware, seed=args.seed)
        tried_rates: list[float] = []

        def point(aps: float, spec: ClusterSpec = spec, tried_rates: list[float] = tried_rates) -> RunResult:
            tried_rates.append(aps)
            with console.status(f"{spec.mode.name}: {aps:.3f} agents/s"):
                return run_online(spec, pool, aps, args.duration, args.duration / 2, setting, args.seed)

        capacities[mode.name], sweeps[mode.name] = capacity_at_slo(point, low, high)
        rates[mode.name] = tried_rates
        console.print(f"{mode.name}: {capacities[mode.name]:.3f} agents/s at TTFT <= 4 s, TPOT <= 50 ms")
    (args.out / "online.json").write_text(json.dumps(
        {"capacity_aps": capacities,
         "points": {m: [dict(asdict(r), aps=a) for r, a in zip(sweeps[m], rates[m], strict=True)] for m in sweeps}},
        indent=2))
    chart = online_chart(args.out / "online_ttft.png", sweeps, rates)
    console.print(f"wrote {args.out / 'online.json'} and {chart}")
    return 0
