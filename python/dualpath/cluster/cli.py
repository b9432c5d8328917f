"""``dualpath ab``: start a local cluster, replay real agent traces through the baseline and DualPath
routers, print the A/B table, write plots and benchmark records, and stop everything. ``dualpath up``: start
the same cluster with one router and keep it serving until Ctrl-C."""

from __future__ import annotations

import argparse
import shlex
import signal
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console
from rich.table import Table

from dualpath.cluster.ab import (
    SWAPS,
    RunSummary,
    clock,
    describe,
    estimate_minutes,
    ratio_intervals,
    result_records,
    run_ab,
    write_json,
)
from dualpath.cluster.local import MIN_KV_TOKENS, STOCK, STOCK_ROUTER, ClusterConfig, LocalCluster, Servers
from dualpath.cluster.online import DATASETS, Load, Slo, agent_pool, agents_for
from dualpath.cluster.online_ab import online_records, online_table, plot_online, run_online_ab, write_online
from dualpath.cluster.progress import AnyProgress, progress_for
from dualpath.cluster.replay import TOP_LOGPROBS
from dualpath.cluster.servers import TINY_MODEL, with_random_weights
from dualpath.router.config import ROUTER_MODES
from dualpath.traces import AgentTrace

T = TypeVar("T")
THROUGHPUT_TARGETS = {(1, 1): 1.8, (1, 2): 2.5}  # DualPath / baseline, (prefill, decode) servers
APS_TARGETS = {(1, 1): ">= 1.6x (the paper: 1.67x for DS27B on 1P1D)"}
ONLINE_KV_TOKENS = 2048


@dataclass(frozen=True)
class Regime:
    """A preset of the storage-NIC cap of every node, for the tiny Llama on CPU (2 KiB of KV a token)."""

    nic_gbps: float
    throughput_target: str
    summary: str


REGIMES = {
    "storage-bound": Regime(0.005, "", "625 kB/s: the prefill's NIC is busy ~90% of a baseline run and bounds its "
                            "throughput, the paper's regime"),
    "mixed": Regime(0.05, "between 1x and the storage-bound ratio", "10x the storage-bound cap: reads and compute "
                    "take comparable time"),
    "compute-bound": Regime(1.0, ">= 0.97x with its interval (DualPath must not slow compute-bound serving)",
                            "200x the storage-bound cap: reads take a small part of a turn"),
}


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """The shape of a local cluster, shared by ``ab`` and ``up``."""
    p.add_argument("--prefill", type=int, default=1, help="prefill servers (each its own node)")
    p.add_argument("--decode", type=int, default=1, help="decode servers (each its own node)")
    p.add_argument("--regime", choices=REGIMES, default="storage-bound",
                   help="; ".join(f"{name}: --nic-gbps {r.nic_gbps:g}, {r.summary}" for name, r in REGIMES.items())
                   .replace("%", "%%"))
    p.add_argument("--nic-gbps", type=float, help="storage-NIC cap of every node, Gb/s (default: the --regime's)")
    p.add_argument("--model", type=Path,
                   help="model path (default: the tiny Llama shipped, given random weights in the work dir)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available (then give the model and --server-args for it)")
    p.add_argument("--server-args", default="", help="extra sglang.launch_server arguments for every server")
    p.add_argument("--kv-bytes-per-token", type=int, default=ClusterConfig.bytes_per_token,
                   help="KV bytes per token of the model (sets the router's read rate; default: the tiny Llama)")
    p.add_argument("--kv-tokens", type=int,
                   help="a prefill's KV memory in tokens (its device pool, 1.1x that host pool) and every server's "
                   "storage slots (as many tokens); default: room for every agent, or "
                   f"{ONLINE_KV_TOKENS} with --search-aps (the agents outnumber the memory, as in the paper, so "
                   "their hits come from the store)")
    p.add_argument("--base-port", type=int, default=32000)
    p.add_argument("--work-dir", type=Path, help="store and logs (default: a temporary directory)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ab", help="A/B: baseline vs DualPath on a local cluster of real SGLang servers",
                              description=__doc__)
    add_cluster_args(p)
    p.add_argument("--dualpath-mode", choices=ROUTER_MODES, default="split",
                   help="the router's mode of the B run: split (DualPath that may also split one request's reads "
                   "between both sides; beyond the paper), dualpath (each request read whole on one side, "
                   "as in the paper) or baseline (to compare our baseline with the stock stack)")
    p.add_argument("--baseline", choices=(STOCK, STOCK_ROUTER, "ours"), default=STOCK,
                   help="the A run: stock (the stock stack: sglang_router 0.3.2 in PD mode over stock SGLang servers, "
                   "plugin off, reading the same store through the same NIC caps as a HiCache backend), "
                   "stock-router (sglang_router 0.3.2 over DualPath's servers: no route hint, every hit read on "
                   "the prefill side), or ours in baseline mode")
    p.add_argument("--trace", choices=DATASETS, default="claude-code")
    p.add_argument("--trace-path", type=Path, help="trace directory (claude-code) or file (mooncake); "
                   "default: the samples shipped with the package")
    p.add_argument("--agents", type=int, default=16, help="agents (sessions) replayed concurrently; beyond the "
                   "trace's, copies of its sessions with token ids of their own")
    p.add_argument("--turns", type=int, default=20, help="turns per agent at most (the first one warms up)")
    p.add_argument("--scale", type=float, default=0.025,
                   help="token counts of every turn x this (hit ratios stay; CPU attention cost falls quadratically)")
    p.add_argument("--max-gen", type=int, default=16, help="output tokens per turn at most")
    p.add_argument("--max-context", type=int, default=20_000,
                   help="skip agents whose (scaled) prompts grow beyond this")
    online = p.add_argument_group(
        "online (the paper's Figure 10)", "--search-aps: agents arrive by a Poisson process and run their sessions "
        "with their think time; for each stack, a bisection finds the highest arrival rate whose run meets the SLO")
    online.add_argument("--search-aps", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="search the agents/s of each stack in [LOW, HIGH]")
    online.add_argument("--aps-resolution", type=float, default=0.02, help="the search's resolution, agents/s")
    online.add_argument("--num-prompts", type=int, default=80, help="turns each probe sends")
    online.add_argument("--think-time-scale", type=float, default=0.25,
                        help="an agent waits its trace's think time x this before each turn")
    online.add_argument("--slo-ttft-ms", type=float, default=4000.0, help="mean TTFT SLO (the paper's: 4 s)")
    online.add_argument("--slo-tpot-ms", type=float, default=50.0, help="mean TPOT SLO (the paper's: 50 ms)")
    p.add_argument("--out", type=Path, default=Path("dualpath-ab"), help="folder for the plots and records")
    p.add_argument("--name", default="cluster_ab", help="name of the records file <out>/<name>.json")
    p.set_defaults(run=run)
    up = subparsers.add_parser("up", help="start a local PD cluster and its router; serve until Ctrl-C",
                               description="Start P prefill and D decode real SGLang servers (each its own node "
                               "with its own storage-NIC cap over one store directory) and a router; print the "
                               "router's URL and serve (curl, an OpenAI client, `dualpath bench --base-url`) until "
                               "Ctrl-C or SIGTERM, then stop every process.")
    add_cluster_args(up)
    up.add_argument("--mode", choices=(*ROUTER_MODES, STOCK_ROUTER, STOCK), default="split",
                    help="the router: ours in one of its modes over DualPath's servers (baseline: every hit read on "
                    "the prefill side), the stock sglang_router 0.3.2 over them (stock-router), or the stock stack "
                    "(stock: the stock router over stock servers with the block store as HiCache backend)")
    up.set_defaults(run=serve)


def select_agents(args: argparse.Namespace) -> list[AgentTrace]:
    """The ``--agents`` sessions with the most turns (Mooncake's: its requests grouped by shared prefixes), then
    copies of them."""
    try:
        return agents_for(agent_pool(args.trace, args.trace_path, args.scale, args.max_context, args.turns), 1,
                          args.agents)[: args.agents]
    except ValueError as exc:
        raise SystemExit(f"dualpath ab: {exc}") from None


def table(summaries: Sequence[RunSummary], nodes: Sequence[str]) -> Table:
    t = Table(title=f"A/B: {summaries[0].mode} vs {summaries[1].mode}")
    t.add_column("metric")
    for s in summaries:
        t.add_column(s.mode, justify="right")
    t.add_column(f"{summaries[1].mode} / {summaries[0].mode} (95% interval)", justify="right")
    intervals = ratio_intervals(*summaries)
    rows = [("throughput (tokens/s)", "tokens_per_s", "{:.0f}"), ("JCT p50 (s)", "jct_p50_s", "{:.1f}"),
            ("JCT p99 (s)", "jct_p99_s", "{:.1f}"), ("TTFT p50 (s)", "ttft_p50_s", "{:.2f}"),
            ("TTFT p99 (s)", "ttft_p99_s", "{:.2f}"), ("TPOT p50 (ms)", "tpot_p50_s", "{:.1f}"),
            ("TPOT p99 (ms)", "tpot_p99_s", "{:.1f}"), ("ITL p50 (ms), every token", "itl_p50_s", "{:.1f}"),
            ("ITL p99 (ms), every token", "itl_p99_s", "{:.1f}"), ("hit KV read by DEs", "de_read_share", "{:.0%}"),
            ("failed requests", "failed", "{}")]
    for label, field, fmt in rows:
        values = [getattr(s, field) * (1000 if field.startswith(("tpot", "itl")) else 1) for s in summaries]
        ratio = f"{values[1] / values[0]:.2f}x" if values[0] and field != "failed" else ""
        interval = intervals.get("throughput" if field == "tokens_per_s" else field.removesuffix("_s"))
        if ratio and interval:
            ratio += f" ({interval[0]:.2f}-{interval[1]:.2f})"
        t.add_row(label, *(fmt.format(v) for v in values), ratio)
    t.add_row(f"answers equal through the other router (top-{TOP_LOGPROBS} logprobs)",
              *(f"{s.outputs_checked - len(s.outputs_differing)}/{s.outputs_checked}" for s in summaries), "")
    for node in nodes:
        t.add_row(f"storage NIC {node} busy", *(f"{s.nic_utilisation[node]:.0%}" for s in summaries), "")
    for node in nodes:  # the whole replay, warm-up round included
        t.add_row(f"CPU s, {node}'s server", *(f"{s.cpu_s.get(node, 0):.0f}" for s in summaries), "")
    return t


def plot(summaries: Sequence[RunSummary], nodes: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(16, 7.2))
    grid = fig.add_gridspec(2, 4)
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)]
    modes = [s.mode for s in summaries]
    axes[0].bar(modes, [s.tokens_per_s for s in summaries], color=["#999", "#2a7"])
    axes[0].set_title("throughput (tokens/s)")
    for i, (label, fields) in enumerate((("TTFT (s)", ("ttft_p50_s", "ttft_p99_s")),
                                         ("TPOT (ms)", ("tpot_p50_s", "tpot_p99_s")),)):
        ax = axes[1 + i]
        for j, s in enumerate(summaries):
            scale = 1000 if "tpot" in fields[0] else 1
            ax.bar([j * 3, j * 3 + 1], [getattr(s, f) * scale for f in fields], color=["#2a7", "#a72"][j % 2])
        ax.set_xticks([0, 1, 3, 4], [f"{m}\np50" if k == 0 else "p99" for m in modes for k in (0, 1)])
        ax.set_title(label)
    width = 0.4
    for j, s in enumerate(summaries):
        axes[3].bar([i + j * width for i in range(len(nodes))], [100 * s.nic_utilisation[n] for n in nodes],
                    width, label=s.mode)
    axes[3].set_xticks([i + width / 2 for i in range(len(nodes))], nodes)
    axes[3].set_title("storage NIC busy (%)")
    axes[3].legend()
    timelines = [fig.add_subplot(grid[1, 0:2]), fig.add_subplot(grid[1, 2:4])]
    for ax, s in zip(timelines, summaries, strict=True):
        for node in nodes:
            samples = np.array(s.nic_timeline.get(node) or [(0.0, 0)], dtype=float)
            rate = np.diff(samples[:, 1]) / np.maximum(np.diff(samples[:, 0]), 1e-9) / 1e6
            ax.plot(samples[1:, 0], rate, label=node, lw=1)
        ax.set_title(f"{s.mode}: storage NIC reads over its measured rounds (MB/s)")
        ax.set_xlabel("s of measured rounds, back to back (the other mode's rounds and the flushes left out)")
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops every server


def nic_gbps(args: argparse.Namespace) -> float:
    return REGIMES[args.regime].nic_gbps if args.nic_gbps is None else args.nic_gbps


def kv_tokens(args: argparse.Namespace) -> int | None:
    if args.kv_tokens is None and getattr(args, "search_aps", None):
        return ONLINE_KV_TOKENS
    return args.kv_tokens


def cluster_config(args: argparse.Namespace, work: Path, command: str, servers: Servers) -> ClusterConfig:
    """The cluster of the command line; without ``--model``, the tiny Llama with random weights (its dummy
    weights give every token the same logit, and outputs compared across modes must be able to differ)."""
    server_args = tuple(shlex.split(args.server_args))
    model = args.model
    if model is None:
        model = with_random_weights(TINY_MODEL, work / "tiny_llama")
        server_args = ("--load-format", "safetensors", *server_args)
    try:
        return ClusterConfig(work, args.prefill, args.decode, nic_gbps(args), args.base_port, model,
                             on_cpu(args.device), server_args=server_args, bytes_per_token=args.kv_bytes_per_token,
                             servers=servers, kv_tokens=kv_tokens(args))
    except ValueError as exc:
        raise SystemExit(f"dualpath {command}: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell starting us in the background ignores it
    console = Console()
    with tempfile.TemporaryDirectory(prefix="dualpath-up-") as scratch:
        work = args.work_dir or Path(scratch)
        cluster = LocalCluster(cluster_config(args, work, "up", "stock" if args.mode == STOCK else "dualpath"))
        console.print(f"[{clock()}] starting {args.prefill}P{args.decode}D (logs in {work / 'logs'}) ...")
        try:
            cluster.start()
            url = cluster.route(args.mode)
            router_pid = cluster.routers[args.mode][0].pid
            console.print(f"[{clock()}] [bold]serving[/] at {url} (router mode {args.mode}, pid {router_pid}; servers "
                          f"{', '.join(f'{s.url} (pid {s.process.pid})' for s in cluster.servers)}); "
                          "Ctrl-C stops every process", highlight=False)
            console.print(f"  try: dualpath bench --base-url {url} --num-prompts 20", highlight=False)
            signal.pause()
        except KeyboardInterrupt:
            console.print(f"[{clock()}] stopping ...")
        finally:
            cluster.stop()
    return 0


def on_cluster(args: argparse.Namespace, console: Console, baseline: str,
               work: Callable[[LocalCluster, AnyProgress], T]) -> tuple[T, list[str]]:
    """``work(cluster, progress)`` on the command line's cluster (the stock set too for a stock baseline), started
    in ``--work-dir`` or a temporary directory and stopped on every path; its result and the cluster's nodes."""
    with tempfile.TemporaryDirectory(prefix="dualpath-ab-") as scratch:
        directory = args.work_dir or Path(scratch)
        config = cluster_config(args, directory, "ab", "both" if baseline == STOCK else "dualpath")
        cluster = LocalCluster(config)
        console.print(f"[{clock()}] starting servers (logs in {directory / 'logs'}) ...")
        try:
            cluster.start()
            console.print(f"[{clock()}] servers ready")
            with progress_for(console) as progress:
                return work(cluster, progress), config.nodes
        finally:
            cluster.stop()


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)
    console = Console()
    baseline = "baseline" if args.baseline == "ours" else args.baseline
    if baseline == args.dualpath_mode:
        raise SystemExit("dualpath ab: --dualpath-mode baseline compares our baseline with another router: "
                         f"give --baseline {STOCK}")
    if args.search_aps:
        return run_online(args, console, baseline)
    agents = select_agents(args)
    turns = sum(len(a.turns) for a in agents)
    minutes = estimate_minutes(agents, args.kv_bytes_per_token, nic_gbps(args), args.prefill, args.scale,
                               SWAPS if baseline == STOCK else 0)
    model = "tiny Llama, random weights" if args.model is None else str(args.model)
    device = "CPU" if on_cpu(args.device) else "CUDA"
    console.print(f"[bold]dualpath ab[/]: {args.prefill}P{args.decode}D real SGLang servers ({model}, {device}), "
                  f"storage NIC {nic_gbps(args):g} Gb/s per node ({args.regime if args.nic_gbps is None else 'set'}); "
                  f"{len(agents)} {args.trace} agents, "
                  f"{turns} turns x {args.scale} tokens, <= {args.max_gen} output tokens each. "
                  f"Estimated ~{minutes:.0f} min.")
    summaries, nodes = on_cluster(args, console, baseline, lambda cluster, progress: run_ab(
        cluster, agents, args.max_gen, args.scale, progress, args.dualpath_mode, baseline))
    console.print(table(summaries, nodes))
    for s in summaries:
        if s.failed:
            console.print(f"[red]{s.mode}: {s.failed} requests failed[/], first: {s.first_error}")
        for difference in s.outputs_differing:
            console.print(f"[red bold]{s.mode}: an answer changed[/]: {difference}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(summaries, nodes, args.out / f"{args.name}.png")
    bound = (args.prefill + args.decode) / args.prefill  # every node's NIC reads, not only the PEs'
    wanted = THROUGHPUT_TARGETS.get((args.prefill, args.decode))
    target = {"throughput": (f">= {wanted}x " if wanted else "") + f"(bound {bound:g}x) with the PE storage NIC "
                            "the bottleneck", "tpot_p50": "within 5% of baseline",
              "itl_p50": "within 5% of baseline (TPOT over every token interval)"}
    if args.nic_gbps is None and REGIMES[args.regime].throughput_target:
        target["throughput"] = REGIMES[args.regime].throughput_target
    if args.dualpath_mode == "baseline":  # two routers that both read on the PE side
        target = {"throughput": "1.0x within noise (the interval holds 1)"}
    write_json(args.out / f"{args.name}.json", summaries, result_records(summaries, args.command_line, target))
    console.print(f"plots and records in {args.out}/")
    return 0 if all(s.failed == 0 and not s.outputs_differing and s.outputs_checked for s in summaries) else 1


def run_online(args: argparse.Namespace, console: Console, baseline: str) -> int:
    """``dualpath ab --search-aps``: each stack's agents/s within the SLO, baseline first."""
    low, high = args.search_aps
    memory = kv_tokens(args)
    try:
        if memory < MIN_KV_TOKENS:
            raise ValueError(f"--kv-tokens must be >= {MIN_KV_TOKENS}, got {memory}")
        pool = agent_pool(args.trace, args.trace_path, args.scale, min(args.max_context, memory - args.max_gen),
                          args.turns)
        load = Load(args.num_prompts, agent_rate=low, think_scale=args.think_time_scale, max_gen=args.max_gen,
                    scale=args.scale)
        slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
        if not 0 < low < high or args.aps_resolution <= 0:
            raise ValueError(f"--search-aps needs 0 < LOW < HIGH and --aps-resolution > 0, got {low} {high} "
                             f"{args.aps_resolution}")
    except ValueError as exc:
        raise SystemExit(f"dualpath ab: {exc}") from None
    console.print(f"[bold]dualpath ab --search-aps[/]: {args.prefill}P{args.decode}D, storage NIC {nic_gbps(args):g} "
                  f"Gb/s per node, {memory} tokens of KV a prefill; {args.trace} agents (<= {args.turns} turns, "
                  f"x{args.scale} tokens, think time x{args.think_time_scale}), {args.num_prompts} turns a probe; "
                  f"agents/s in [{low:g}, {high:g}] to {args.aps_resolution:g}, {baseline} then {args.dualpath_mode}")
    stacks, _ = on_cluster(args, console, baseline, lambda cluster, progress: run_online_ab(
        cluster, (baseline, args.dualpath_mode), pool, load, slo, low, high, args.aps_resolution, progress=progress))
    console.print(online_table(stacks, slo, args.aps_resolution, high))
    args.out.mkdir(parents=True, exist_ok=True)
    plot_online(stacks, slo, args.out / f"{args.name}.png")
    target = APS_TARGETS.get((args.prefill, args.decode), "")
    write_online(args.out / f"{args.name}.json", stacks,
                 online_records(stacks, args.aps_resolution, high, args.command_line, target, describe(baseline)))
    console.print(f"plots and records in {args.out}/")
    return 0 if all(p.failed == 0 for s in stacks for p in s.probes) else 1
