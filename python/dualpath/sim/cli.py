"""`dualpath simulate`: run simulated PD clusters offline (JCT) or online (agents/s at SLO) and plot them."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dualpath.scheduler.modes import MODES, Mode, get_mode
from dualpath.sim.calibrate import Calibration, MeasuredAB, Prediction, fit, predict
from dualpath.sim.cluster import ClusterSpec
from dualpath.sim.hardware import MODELS, HardwareSpec, ModelSpec, get_model
from dualpath.sim.plots import bar_chart, offline_chart, online_chart
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
    measured = parser.add_argument_group(
        "calibrated on a real cluster", "the simulator stands for a cluster that `dualpath ab` measured: the cost "
        "model fitted on some of its runs (<name>.runs.json, with <name>.json beside it) predicts others")
    measured.add_argument("--calibrate", nargs="+", type=Path, metavar="RUNS",
                          help="fit the cost model on these runs; writes <out>/<name>.calibration.json")
    measured.add_argument("--predict", nargs="+", type=Path, metavar="RUNS",
                          help="replay these runs' requests, round by round, with the calibration; prints the "
                          "predicted A/B beside the measured one and writes <out>/<name>.json and .png")
    measured.add_argument("--calibration", type=Path,
                          help="a calibration.json to predict with (default: --calibrate's)")
    measured.add_argument("--name", default="sim_calibrated",
                          help="files: <out>/<name>.calibration.json, and --predict's records <out>/<name>.json")
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
    if args.calibrate or args.predict:
        return _run_measured(args, console)
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


def _run_measured(args: argparse.Namespace, console: Console) -> int:
    """--calibrate and/or --predict: fit the cost model on measured runs, replay others with it."""
    if args.predict and not (args.calibrate or args.calibration):
        raise SystemExit("dualpath simulate: --predict needs --calibrate RUNS or --calibration FILE")
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["dualpath", "simulate",
                          *(["--calibrate", *map(str, args.calibrate)] if args.calibrate else []),
                          *(["--calibration", str(args.calibration)] if args.calibration else []),
                          *(["--predict", *map(str, args.predict)] if args.predict else []),
                          "--out", str(args.out), "--name", args.name])
    try:
        if args.calibrate:
            fitted = [MeasuredAB.load(path) for path in args.calibrate]
            with console.status(f"fitting the cost model on {len(fitted)} runs"):
                calibration = fit(fitted)
            calibration.save(args.out / f"{args.name}.calibration.json")
            console.print(_measured_table("calibration runs, replayed", predict(calibration, fitted)))
            console.print(f"fitted (mean squared log error {calibration.fit_error:.4f}): prefill "
                          f"{calibration.prefill_overhead_s * 1e3:.0f} ms + "
                          f"{calibration.prefill_per_token_s * 1e6:.2f} us/token + "
                          f"{calibration.prefill_per_pair_s * 1e9:.2f} ns/pair; decode step "
                          f"{calibration.decode_base_s * 1e3:.1f} ms + {calibration.decode_per_request_s * 1e3:.2f} "
                          f"ms/request; storage NIC {calibration.storage_efficiency:.3f} x cap; "
                          f"wrote {args.out / f'{args.name}.calibration.json'}")
        else:
            calibration = Calibration.load(args.calibration)
        if args.predict:
            predictions = predict(calibration, [MeasuredAB.load(path) for path in args.predict])
            console.print(_measured_table("predicted (not used to calibrate)", predictions))
            records = [record for p in predictions for record in _prediction_records(p, calibration, command)]
            (args.out / f"{args.name}.json").write_text(json.dumps(records, indent=2) + "\n")
            chart = bar_chart(args.out / f"{args.name}.png", "throughput ratio B / A: simulated vs measured",
                              [p.run.name for p in predictions], [p.ratio for p in predictions], "B / A",
                              [p.run.measured_ratio for p in predictions], reference_label="measured")
            console.print(f"wrote {args.out / f'{args.name}.json'} and {chart}")
    except (ValueError, OSError) as exc:
        raise SystemExit(f"dualpath simulate: {exc}") from None
    return 0


def _measured_table(title: str, predictions: list[Prediction]) -> Table:
    table = Table(title=title)
    for column in ("run", "shape", "A / B", "B/A measured", "B/A simulated", "error", "TTFT p50 A meas / sim",
                   "TTFT p50 B meas / sim"):
        table.add_column(column, justify="right")
    for p in predictions:
        run = p.run
        table.add_row(run.name, f"{run.prefill}P{run.decode}D {run.nic_gbps:g} Gb/s", f"{run.a.mode} / {run.b.mode}",
                      f"{run.measured_ratio:.2f}x", f"{p.ratio:.2f}x", f"{p.ratio / run.measured_ratio - 1:+.0%}",
                      f"{run.a.ttft_p50_s:.2f} / {p.a.ttft_p50_s:.2f} s",
                      f"{run.b.ttft_p50_s:.2f} / {p.b.ttft_p50_s:.2f} s")
    return table


def _prediction_records(p: Prediction, calibration: Calibration, command: str) -> list[dict]:
    run = p.run
    target = f"within 10% (calibrated on {', '.join(calibration.fitted_on)})"
    measured = f"measured by `{run.command}`"
    rows = [(f"throughput_ratio[{run.name}]", p.ratio, "x", run.measured_ratio),
            (f"ttft_p50[{run.name}][{run.a.mode}]", p.a.ttft_p50_s, "s", run.a.ttft_p50_s),
            (f"ttft_p50[{run.name}][{run.b.mode}]", p.b.ttft_p50_s, "s", run.b.ttft_p50_s)]
    calibrated_by = " && ".join(f"dualpath ab ... ({c})" for c in calibration.fitted_on)
    return [{"metric": metric, "value": value, "unit": unit, "baseline": measured, "baseline_value": baseline,
             "ratio": value / baseline, "target": target, "command": command, "calibrated_on": calibrated_by,
             "machine": f"{platform.machine()} {os.cpu_count()} cores (the simulator's host)",
             "date": datetime.now(UTC).date().isoformat()} for metric, value, unit, baseline in rows]
