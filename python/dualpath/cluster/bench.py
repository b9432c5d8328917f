"""``dualpath bench``: agent traces against a running PD cluster, with ``sglang.bench_serving``'s conventions.

Point ``--base-url`` at any router (DualPath's, or the stock ``sglang_router``) or at ``dualpath up``. Flags and
the JSONL line follow ``python -m sglang.bench_serving`` (``--backend``, ``--dataset-name``, ``--num-prompts``,
``--request-rate``, ``--max-concurrency``, ``--seed``, ``--tag``, ``--output-file``, ``--output-details``; the
result's field names), with ``bench_multiturn``'s agents: each agent sends its turns in order, its context grown
by the answers it got (``--num-clients`` agents at once, or ``--agent-rate`` Poisson arrivals). DualPath adds the
bytes each node's storage NIC read and the share read by decode nodes (from the servers' ``/dualpath/info``,
found through the router's ``/workers``; none with stock servers), SLO attainment, and ``--search-aps``: the
highest agent rate that meets the SLO. Nothing here touches the store: attach mode works from any host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
from rich.console import Console

from dualpath.cluster.online import DATASETS, Load, LoadResult, Slo, agent_pool, capacity, run_load
from dualpath.cluster.progress import AnyProgress, progress_for
from dualpath.cluster.replay import RequestRecord
from dualpath.scheduler.report import REPORT_ROUTE, NodeReport
from dualpath.traces import AgentTrace


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="agent traces against a running cluster (sglang.bench_serving style)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="the router's (or a server's) URL; default http://<host>:<port>")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--backend", choices=("sglang",), default="sglang",
                   help="sglang: /generate with token ids (the traces are ids; OpenAI routes need text)")
    p.add_argument("--dataset-name", choices=DATASETS, default="claude-code")
    p.add_argument("--dataset-path", type=Path, help="trace directory (claude-code) or file (mooncake); "
                   "default: the samples shipped with the package")
    p.add_argument("--num-prompts", type=int, default=100, help="requests (agent turns) to send")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="turns released per second at most, Poisson (default inf: as soon as an agent is ready)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--num-clients", type=int, default=8,
                   help="closed loop (bench_multiturn): agents running side by side, the next starting when one ends")
    p.add_argument("--agent-rate", type=float,
                   help="online: agents arrive by a Poisson process at this many agents/s (instead of all at once)")
    p.add_argument("--think-time-scale", type=float, default=0.0,
                   help="an agent waits its trace's think time x this before each turn (0: none)")
    p.add_argument("--scale", type=float, default=0.25, help="token counts of every turn x this (hit ratios stay)")
    p.add_argument("--max-gen", type=int, default=16, help="output tokens per turn at most")
    p.add_argument("--max-context", type=int, default=20_000, help="skip agents whose scaled prompts grow beyond this")
    p.add_argument("--slo-ttft-ms", type=float, default=4000.0, help="TTFT SLO (the paper's: 4 s)")
    p.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT SLO (the paper's: 50 ms)")
    p.add_argument("--search-aps", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="search the highest --agent-rate in [LOW, HIGH] agents/s that meets the SLO (mean TTFT and "
                   "TPOT within it, no failure); one run of --num-prompts per probe")
    p.add_argument("--aps-resolution", type=float, default=0.05, help="the search's resolution, agents/s")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tag", help="kept in the output line")
    p.add_argument("--output-file", type=Path, help="JSONL to append to (default: sglang_<MMDD>_<n>_<dataset>.jsonl)")
    p.add_argument("--output-details", action="store_true", help="add per-request lists (input_lens, ttfts, itls, ...)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.set_defaults(run=run)


def _stats(values_ms: Sequence[float], name: str) -> dict[str, float]:
    values = np.asarray(values_ms, dtype=float) if len(values_ms) else np.zeros(1)
    return {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values)),
            f"std_{name}_ms": float(values.std()), **{f"p{q}_{name}_ms": float(np.percentile(values, q))
                                                       for q in (90, 95, 99)}}


def metrics(result: LoadResult) -> dict[str, Any]:
    """``sglang.bench_serving``'s result fields (its names and units) for one run."""
    ok = [r for r in result.records if r.ok]
    duration = result.duration_s
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    ends = sorted(r.start_s + r.e2e_s for r in ok)
    per_second = np.bincount(np.asarray([int(e) for e in ends], dtype=int)) if ends else np.zeros(1)
    return {"duration": duration, "completed": len(ok), "total_input_tokens": total_input,
            "total_output_tokens": total_output, "request_throughput": len(ok) / duration,
            "input_throughput": total_input / duration, "output_throughput": total_output / duration,
            "total_throughput": (total_input + total_output) / duration,
            **_stats([r.e2e_s * 1e3 for r in ok], "e2e_latency"), **_stats([r.ttft_s * 1e3 for r in ok], "ttft"),
            **_stats([t * 1e3 for r in ok if (t := r.tpot_s) is not None], "tpot"),
            **_stats([i * 1e3 for r in ok for i in r.token_intervals_s], "itl"),
            "concurrency": sum(r.e2e_s for r in ok) / duration,
            "max_output_tokens_per_s": float(max(per_second)) if ok else 0.0,  # answers finished per second, as
            "max_concurrent_requests": result.max_in_flight}                   # close as a client sees tokens


def details(records: Sequence[RequestRecord]) -> dict[str, list]:
    return {"input_lens": [r.prompt_tokens for r in records], "output_lens": [r.output_tokens for r in records],
            "ttfts": [r.ttft_s for r in records], "itls": [list(r.token_intervals_s) for r in records],
            "generated_texts": ["" for _ in records], "errors": [r.error for r in records],
            "cached_tokens": [r.context_tokens for r in records]}


async def node_reads(url: str) -> dict[str, tuple[str, int]] | None:
    """Each DualPath node behind the router at ``url``: (role, bytes its storage NIC read); None when the router
    lists no workers (a single server) or none is a DualPath server."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(f"{url}/workers") as response:
                workers = (await response.json())["workers"] if response.status == 200 else []
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return None

        async def report(worker_url: str) -> NodeReport | None:
            try:
                async with session.get(f"{worker_url}{REPORT_ROUTE}") as response:
                    return NodeReport.decode(await response.read()) if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
                return None

        reports = await asyncio.gather(*(report(w["url"]) for w in workers if isinstance(w, dict) and "url" in w))
    nodes = {r.node: (r.role, r.read_bytes) for r in reports if r is not None}
    return nodes or None


def dualpath_fields(before: dict[str, tuple[str, int]] | None, after: dict[str, tuple[str, int]] | None,
                    duration_s: float) -> dict[str, Any]:
    """Bytes each node's storage NIC read during the run, their rate, and the share read by decode nodes."""
    if not before or not after:
        return {"node_read_bytes": None, "de_read_share": None}
    read = {node: after[node][1] - before.get(node, (role, 0))[1] for node, (role, _) in after.items()}
    total = sum(read.values())
    return {"node_read_bytes": read, "node_read_gbps": {n: b * 8 / 1e9 / duration_s for n, b in read.items()},
            "de_read_share": sum(b for n, b in read.items() if after[n][0] == "decode") / total if total else 0.0}


async def measure(url: str, agents: Sequence[AgentTrace], load: Load, seed: int, slo: Slo,
                  progress: AnyProgress | None = None) -> dict[str, Any]:
    """One run: bench_serving's fields, DualPath's node reads and the SLO, and the run's records."""
    before = await node_reads(url)
    task = progress.add_task(f"agent rate {load.agent_rate}" if load.agent_rate else "requests",
                             total=load.num_prompts) if progress else None
    result = await run_load(url, agents, load, seed,
                            on_done=(lambda _: progress.advance(task)) if progress is not None else None)
    after = await node_reads(url)
    return {**metrics(result), **dualpath_fields(before, after, result.duration_s), "agents": result.agents,
            "agent_rate": load.agent_rate, "failed": len(result.records) - sum(r.ok for r in result.records),
            "slo_ttft_ms": slo.ttft_s * 1e3, "slo_tpot_ms": slo.tpot_s * 1e3,
            "slo_attainment": slo.attainment(result.records), "slo_met": slo.met(result.records),
            "_result": result}


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    try:
        agents = agent_pool(args.dataset_name, args.dataset_path, args.scale, args.max_context)
        load = Load(args.num_prompts, args.request_rate, args.max_concurrency, args.agent_rate, args.num_clients,
                    args.think_time_scale, args.max_gen, args.scale, args.timeout)
    except ValueError as exc:
        raise SystemExit(f"dualpath bench: {exc}") from None
    slo = Slo(args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    server_info = asyncio.run(_server_info(url))
    if server_info is None:
        raise SystemExit(f"dualpath bench: nothing answers at {url} (start one with `dualpath up`)")
    with progress_for(console) as progress:
        if args.search_aps:
            low, high = args.search_aps
            runs: list[dict[str, Any]] = []

            def run_at(rate: float) -> LoadResult:
                runs.append(asyncio.run(measure(url, agents, replace(load, agent_rate=rate),
                                                args.seed + len(runs), slo, progress)))
                return runs[-1]["_result"]

            try:
                aps, _ = capacity(run_at, slo, low, high, args.aps_resolution)
            except ValueError as exc:
                raise SystemExit(f"dualpath bench: --search-aps: {exc}") from None
        else:
            runs = [asyncio.run(measure(url, agents, load, args.seed, slo, progress))]
    common = {"tag": args.tag, "backend": args.backend, "dataset_name": args.dataset_name,
              "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
              "max_concurrency": args.max_concurrency, "server_info": server_info, "base_url": url,
              "scale": args.scale, "max_gen": args.max_gen, "think_time_scale": args.think_time_scale,
              "date": datetime.now().isoformat(timespec="seconds")}
    output = args.output_file or Path(f"{args.backend}_{datetime.now():%m%d}_{args.num_prompts}_{args.dataset_name}"
                                      ".jsonl")
    with output.open("a") as out:
        for line in runs:
            result: LoadResult = line.pop("_result")
            record = {**common, **line, **({"aps_at_slo": aps, "aps_resolution": args.aps_resolution}
                                          if args.search_aps else {})}
            out.write(json.dumps(record | (details(result.records) if args.output_details else {})) + "\n")
            _print(console, record)
    if args.search_aps:
        console.print(f"[bold]agents/s at SLO[/] (TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_tpot_ms:g} ms): "
                      f"{aps:.3f} (+- {args.aps_resolution:g}, {len(runs)} probes)")
    console.print(f"appended {len(runs)} line(s) to {output}")
    return 0 if all(line["failed"] == 0 for line in runs) or args.search_aps else 1


async def _server_info(url: str) -> dict | None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for route in ("/get_server_info", "/health"):
            try:
                async with session.get(f"{url}{route}") as response:
                    if response.status == 200:
                        return await response.json(content_type=None) if route == "/get_server_info" else {}
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
    return None


def _print(console: Console, r: dict[str, Any]) -> None:
    share = "" if r["de_read_share"] is None else f", hit KV read by decode nodes {r['de_read_share']:.0%}"
    rate = f"agent rate {r['agent_rate']:g}/s: " if r["agent_rate"] else ""
    console.print(f"{rate}{r['completed']} requests in {r['duration']:.1f} s ({r['failed']} failed), "
                  f"{r['total_throughput']:.0f} tokens/s; TTFT median {r['median_ttft_ms']:.0f} ms "
                  f"p99 {r['p99_ttft_ms']:.0f}; TPOT median {r['median_tpot_ms']:.1f} ms; "
                  f"SLO attainment {r['slo_attainment']:.0%} (met: {r['slo_met']}){share}")

