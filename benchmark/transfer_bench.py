"""Transfer benchmark: raw NIXL vs the layerwise channel, the priority limiter, and (with CUDA) GPU paths.

Run: ``python benchmark/transfer_bench.py [--quick]``. Prints a table and writes
benchmark/results/transfer_bench.json. Every flow runs between separate processes over NIXL/UCX.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")

from transfer_bench_roles import (
    BLOCKS,
    GPU_H2D_CEILING_GBPS,
    LAYOUT,
    REQUESTS,
    layerwise_vs_raw,
    limiter_flows,
    vram_paths,
)

RESULTS = Path(__file__).parent / "results" / "transfer_bench.json"


def record(metric: str, value: float, unit: str, baseline: str, baseline_value: float, target: str) -> dict:
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": value / baseline_value if baseline_value else float("nan"),
        "target": target,
        "command": "python benchmark/transfer_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "date": datetime.now(UTC).date().isoformat(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shorter flows (smoke run)")
    parser.add_argument("--limiter-gbps", type=float, default=6.0, help="emulated compute-NIC rate of the node")
    parser.add_argument("--model-share", type=float, default=0.5, help="model flow's offered load, share of the NIC")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    records = []

    rounds = 3 if args.quick else 9
    layerwise, raw, ceiling = layerwise_vs_raw(ctx, rounds)
    geometry = LAYOUT.geometry
    print(f"{geometry.name}: {geometry.layers} layers, {LAYOUT.block_tokens}-token blocks, "
          f"Layer Block {LAYOUT.layer_block_bytes >> 10} KiB; {REQUESTS} requests x {BLOCKS} blocks per round")
    print(f"raw NIXL, one contiguous descriptor per request {ceiling:7.2f} GB/s  (this machine's ceiling)")
    print(f"raw NIXL, same Layer Block descriptors          {raw:7.2f} GB/s")
    print(f"layerwise channel, one post per layer           {layerwise:7.2f} GB/s  "
          f"({layerwise / raw:.1%} of raw, {layerwise / ceiling:.1%} of the ceiling)")
    records.append(record("layerwise_channel_throughput", layerwise, "GB/s",
                          "raw NIXL WRITE of the same Layer Block descriptors, same processes", raw, ">= 0.90"))
    records.append(record("layerwise_channel_vs_contiguous", layerwise, "GB/s",
                          "raw NIXL WRITE, one contiguous descriptor per request", ceiling, "diagnostic"))

    seconds = 2.0 if args.quick else 4.0
    with tempfile.TemporaryDirectory() as scratch:
        flows = limiter_flows(ctx, Path(scratch) / "node.lim", args.limiter_gbps, args.model_share, seconds)
    nic = args.limiter_gbps / 8
    print(f"priority limiter, emulated NIC {nic:.2f} GB/s, model flow offered {args.model_share:.0%} of it:")
    for name, value in flows.items():
        print(f"  {name:34s} {value:7.3f} GB/s")
    records.append(record("model_flow_with_kv_saturating", flows["model with KV saturating"], "GB/s",
                          "model flow alone", flows["model alone"], ">= 0.95"))
    leftover = nic - flows["model with KV saturating"]
    records.append(record("kv_flow_leftover", flows["KV with model"], "GB/s",
                          "NIC rate minus the model flow", leftover, "> 0 (not starved)"))
    records.append(record("kv_flow_alone", flows["KV alone"], "GB/s", "emulated NIC rate", nic, "diagnostic"))

    gpu = vram_paths(ctx)
    if gpu is None:
        print("GPU part skipped: CUDA is not available (DRAM->VRAM and VRAM->VRAM need a GPU machine)")
    else:
        for name, value in gpu.items():
            print(f"{name:44s} {value:7.2f} GB/s ({value / GPU_H2D_CEILING_GBPS:.1%} of pinned H2D)")
            records.append(record(name.replace(" ", "_").replace(">", ""), value, "GB/s",
                                  "pinned H2D ceiling (measured)", GPU_H2D_CEILING_GBPS, "diagnostic"))

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
