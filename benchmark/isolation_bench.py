"""Traffic isolation while serving: SGLang's PD KV transfer keeps its throughput while DualPath's KV fills the link.

Run: ``python benchmark/isolation_bench.py [--compute-gbps 1] [--pd-requests 8] [--streams 4]``. One prefill and
one decode server (a 16-layer tiny Llama, dummy weights, CPU, NIXL over loopback) share one emulated compute NIC
(``--dualpath-compute-gbps``, ``--dualpath-compute-nic``): SGLang's PD transfer (prefill -> decode, every new
token's KV) is booked on it as high-priority traffic, the DE's forwarding of hit KV (decode -> prefill) as
low-priority traffic. Two phases on the same servers:
- solo: ``--pd-requests`` fresh prompts on the PE side, one after another: PD KV alone on the link;
- loaded: the same number of fresh prompts while ``--streams`` clients keep sending DE-side turns whose hit
  (``--hit`` tokens, written to the store beforehand) the decode forwards to the prefill.
The PD transfer's throughput is measured on the emulated link itself, relative to the same link without DE->PE KV:
the time its grants spent on the link over that time plus the time they waited behind KV grants (1.0: never
waited for KV; waits behind other PD transfers are the link's own). Prints both phases, the DE->PE KV's share of
the link and the PD grants' throughput relative to an idle link (waits behind each other counted too),
and writes ``benchmark/results/isolation_bench.json`` (target: loaded / solo >= 0.95 while the KV fills the link).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from dualpath.cluster.local import ClusterConfig, LocalCluster
from dualpath.cluster.servers import pd_generate, tiny_model_with_layers
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.srt.config import SrtConfig
from dualpath.srt.traffic import compute_nic
from dualpath.transfer import LimiterStats, PriorityLimiter

RESULTS = Path(__file__).parent / "results" / "isolation_bench.json"
ONE_TOKEN = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}


class Phase:
    """The emulated link's counters over one phase."""

    def __init__(self, link: PriorityLimiter) -> None:
        self._link, self._before, self._started = link, link.stats(), time.monotonic()

    def end(self) -> dict[str, float]:
        after, seconds = self._link.stats(), time.monotonic() - self._started
        pd = LimiterStats(after.bytes_per_s, *(a - b for a, b in zip(after[1:], self._before[1:], strict=True)))
        return {"pd_share": pd.model_share_left_by_kv, "pd_link_share": pd.model_share,
                "pd_mib": pd.model_bytes / 2**20, "kv_mib": pd.kv_bytes / 2**20,
                "kv_link_share": pd.kv_bytes / (after.bytes_per_s * seconds), "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-gbps", type=float, default=1.0)
    parser.add_argument("--pd-requests", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024, help="tokens of each PE-side prompt (all sent by PD)")
    parser.add_argument("--hit", type=int, default=2048, help="hit tokens of each DE-side turn")
    parser.add_argument("--streams", type=int, default=4, help="clients sending DE-side turns in the loaded phase")
    parser.add_argument("--turns", type=int, default=48, help="DE-side turns prepared in the store")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--base-port", type=int, default=23200)
    args = parser.parse_args()
    rng = random.Random(0)
    nic = "bench-compute-nic"
    link_flags = ("--dualpath-compute-gbps", str(args.compute_gbps), "--dualpath-compute-nic", nic)
    with tempfile.TemporaryDirectory() as root:
        model = tiny_model_with_layers(Path(root) / "model", args.layers)
        config = ClusterConfig(Path(root) / "cluster", 1, 1, nic_gbps=40.0, base_port=args.base_port, model=model,
                               max_total_tokens=40_000, server_args=link_flags)
        link = PriorityLimiter(compute_nic(SrtConfig("prefill", compute_nic=nic, compute_gbps=args.compute_gbps)))
        with LocalCluster(config) as cluster:
            prefill, decode = cluster.servers
            hint = RouteHint(ReadSide.DE, prefill.report().kv_channel, decode.report().kv_channel).encode()
            print(f"writing {args.turns} prompts of {args.hit} tokens to the store ...", flush=True)
            prompts = [[rng.randrange(3, 32000) for _ in range(args.hit)] for _ in range(args.turns)]
            for ids in prompts:
                pd_generate(prefill, decode, {"input_ids": ids, "sampling_params": ONE_TOKEN})
            if not cluster.wait_stored(prompts, timeout_s=300):
                raise RuntimeError("the decode did not write the prompts back")
            cluster.flush()

            def pe_side_requests() -> None:
                for _ in range(args.pd_requests):
                    ids = [rng.randrange(3, 32000) for _ in range(args.prompt)]
                    pd_generate(prefill, decode, {"input_ids": ids, "sampling_params": ONE_TOKEN})

            phase = Phase(link)
            pe_side_requests()
            solo = phase.end()
            turns, stop = iter(prompts), threading.Event()
            lock = threading.Lock()

            def stream() -> None:
                while not stop.is_set():
                    with lock:
                        ids = next(turns, None)
                    if ids is None:
                        return
                    turn = ids + [rng.randrange(3, 32000) for _ in range(64)]
                    pd_generate(prefill, decode, {"input_ids": turn, "sampling_params": ONE_TOKEN}, hint)

            clients = [threading.Thread(target=stream) for _ in range(args.streams)]
            for client in clients:
                client.start()
            time.sleep(2.0)  # the DE-side turns are under way before the PD requests start
            phase = Phase(link)
            pe_side_requests()
            loaded = phase.end()
            stop.set()
            for client in clients:
                client.join()
            if next(turns, None) is None:
                print("warning: the DE-side turns ran out before the loaded phase ended; raise --turns")
        link.close()
    for name, result in (("solo", solo), ("loaded", loaded)):
        print(f"{name:7} PD KV {result['pd_mib']:7.1f} MiB at {result['pd_share']:.3f} of its rate without DE->PE KV "
              f"({result['pd_link_share']:.3f} of an idle link's); DE->PE KV {result['kv_mib']:7.1f} MiB = "
              f"{result['kv_link_share']:.0%} of the link over {result['seconds']:.1f} s")
    ratio = loaded["pd_share"] / solo["pd_share"]
    print(f"PD KV throughput loaded / solo: {ratio:.3f} (target >= 0.95)")
    record = {"metric": "pd_kv_throughput_under_dualpath_kv", "value": loaded["pd_share"],
              "unit": "PD KV throughput / its throughput without DE->PE KV on the link",
              "baseline": "the same PD requests with no DE->PE KV, same run",
              "baseline_value": solo["pd_share"], "ratio": ratio,
              "target": f">= 0.95 while the DE->PE KV fills the link (here {loaded['kv_link_share']:.0%} of it)",
              "command": "python benchmark/isolation_bench.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
              "date": datetime.now(UTC).date().isoformat()}
    RESULTS.write_text(json.dumps([record], indent=1) + "\n")
    print(f"records in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
