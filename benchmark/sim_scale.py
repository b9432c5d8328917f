"""The paper's 1,152-GPU case in the simulator: 48P96D, 48K agents (Table 3; the 48K-MAL set, whose 2P4D/2K
JCT is the table's 3,167 s). Reports the simulator's wall time and the production scheduler's median
decision time per request at that scale, beside the 2P4D/2K run measured in the same process. The simulator
is single-threaded, so its wall time is its share of one core: the CPU time (recorded too) and the load average
are printed beside it.

    .venv/bin/python benchmark/sim_scale.py [--agents 48000] [--pd 48P96D]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from dualpath.sim import ClusterSpec, build_workload, get_mode, get_model, parse_pd, run_offline

RESULTS = Path(__file__).resolve().parent / "results"


def _record(metric: str, value: float, unit: str, baseline: str, baseline_value: float, target: str) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "baseline": baseline, "baseline_value": baseline_value,
            "ratio": value / baseline_value if baseline_value else None, "target": target,
            "command": "python " + " ".join(["benchmark/sim_scale.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "date": datetime.now(UTC).date().isoformat()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=48_000)
    parser.add_argument("--pd", default="48P96D")
    parser.add_argument("--small-agents", type=int, default=2_000)
    parser.add_argument("--workload", default="synthetic-48k")
    args = parser.parse_args()
    model, mode = get_model("ds660b"), get_mode("dualpath")

    agents = build_workload(args.workload, args.small_agents)
    cpu = time.process_time()
    small = run_offline(ClusterSpec(2, 4, model, mode), agents, f"2P4D {args.small_agents} agents",
                        time_decisions=True)
    small_cpu = time.process_time() - cpu
    print(f"2P4D, {args.small_agents} agents: JCT {small.makespan_s:,.0f} s (paper 3,167 s), "
          f"wall {small.wall_s:.1f} s ({small_cpu:.1f} s CPU), median decision {small.median_decision_us:.1f} us",
          flush=True)

    prefill, decode = parse_pd(args.pd)
    last = [0.0]

    def progress(now: float) -> None:
        if now - last[0] >= 600:
            last[0] = now
            print(f"  simulated {now:,.0f} s", flush=True)

    agents = build_workload(args.workload, args.agents)
    cpu = time.process_time()
    big = run_offline(ClusterSpec(prefill, decode, model, mode), agents, f"{args.pd} {args.agents} agents",
                      progress=progress, time_decisions=True)
    big_cpu = time.process_time() - cpu
    gpus = (prefill + decode) * 8
    print(f"{args.pd} ({gpus} GPUs), {args.agents} agents, {big.requests:,} requests: JCT {big.makespan_s:,.0f} s "
          f"(paper 3,201 s), wall {big.wall_s:.1f} s (target < 600 s; {big_cpu:.1f} s CPU, "
          f"{big_cpu / big.requests * 1e6:.0f} us per request, load average {os.getloadavg()[1]:.1f} over the "
          f"last 5 min), median decision {big.median_decision_us:.1f} us (target < 50 us)", flush=True)

    records = [
        _record("sim_wall_time_1152_gpus", big.wall_s, "s", f"simulator wall time, 2P4D {args.small_agents} agents",
                small.wall_s, "< 600 s"),
        _record("sim_cpu_time_1152_gpus", big_cpu, "s", f"simulator CPU time, 2P4D {args.small_agents} agents",
                small_cpu, "< 600 s of one core (the wall target on an otherwise idle machine)"),
        _record("scheduler_median_decision_time_1152_gpus", big.median_decision_us, "us",
                f"same at 2P4D {args.small_agents} agents", small.median_decision_us, "< 50 us"),
        _record("simulated_jct_48p96d", big.makespan_s, "s", f"simulated JCT 2P4D {args.small_agents} agents",
                small.makespan_s, "paper: 3,201 s vs 3,167 s (ratio 1.01)"),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sim_scale.json").write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {RESULTS / 'sim_scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
