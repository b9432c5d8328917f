"""Layer by layer vs wait-for-all: the TTFT of DE-side requests on a real CPU prefill/decode pair.

Run: ``python benchmark/layerwise_bench.py [--layers 16] [--hit 2048] [--new 512] [--rounds 4]``. A Llama of
``--layers`` layers (the tiny Llama's shape, dummy weights) serves on one prefill and one decode server, NIXL
over loopback, the DE->PE KV paced by an emulated compute NIC (``--compute-gbps``) so that the DE's transfer
takes about as long as the prefill's compute of the new tokens. Each round writes a fresh prompt's ``--hit``
tokens to the store (a PE-side request; the decode writes the pages back), flushes both servers' caches and
then sends the next turn (``--new`` more tokens, one output token) on the DE side: the decode reads the hit
through its NIC and forwards it to the prefill. The same rounds run twice, on the same code: with the
prefill's forward of layer i waiting for layer i only (DualPath) and with ``--dualpath-wait-all-layers``
(the baseline: the request is admitted once every layer landed). Prints a table and writes
``benchmark/results/layerwise_bench.json``: TTFT layer-by-layer / wait-for-all (paper: 0.828 of Basic's JCT;
target < 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from dualpath.cluster.local import ClusterConfig, LocalCluster
from dualpath.cluster.servers import TINY_MLA_MODEL, TINY_MODEL, pd_generate, tiny_model_with_layers
from dualpath.scheduler import ReadSide, RouteHint

RESULTS = Path(__file__).parent / "results" / "layerwise_bench.json"
ARMS = {"layer_by_layer": (), "wait_for_all": ("--dualpath-wait-all-layers",)}


def run_arm(work: Path, model: Path, server_args: tuple[str, ...], args: argparse.Namespace) -> list[float]:
    """TTFTs (s) of ``args.rounds`` DE-side turns on a fresh pair started with ``server_args``."""
    config = ClusterConfig(work, 1, 1, nic_gbps=args.nic_gbps, base_port=args.base_port, model=model,
                           cpu=args.device == "cpu", max_total_tokens=4 * (args.hit + args.new) * (args.rounds + 1),
                           server_args=("--dualpath-compute-gbps", str(args.compute_gbps), *server_args,
                                        *args.server_args.split()))
    rng = random.Random(args.seed)
    one_token = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    ttfts = []
    with LocalCluster(config) as cluster:
        prefill, decode = cluster.servers
        hint = RouteHint(ReadSide.DE, prefill.report().kv_channel, decode.report().kv_channel).encode()
        for round_ in range(args.rounds + 1):  # round 0 warms both servers up and is not counted
            ids = [rng.randrange(3, 32000) for _ in range(args.hit)]
            pd_generate(prefill, decode, {"input_ids": ids, "sampling_params": one_token})
            if not cluster.wait_stored([ids], timeout_s=120):
                raise RuntimeError("the decode did not write the prompt back")
            cluster.flush()
            turn = ids + [rng.randrange(3, 32000) for _ in range(args.new)]
            started = time.perf_counter()
            meta = pd_generate(prefill, decode, {"input_ids": turn, "sampling_params": one_token}, hint)[0]["meta_info"]
            ttft = time.perf_counter() - started
            storage = meta.get("cached_tokens_details", {}).get("storage", 0)
            if storage < args.hit - 64:
                raise RuntimeError(f"round {round_}: the prefill got {storage} of {args.hit} hit tokens from the DE")
            print(f"  round {round_}: TTFT {ttft * 1e3:7.1f} ms" + (" (warm-up)" if round_ == 0 else ""), flush=True)
            if round_:
                ttfts.append(ttft)
    return ttfts


def torch_device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def record(metric: str, value: float, unit: str, baseline_value: float, target: str, argv: list[str]) -> dict:
    return {"metric": metric, "value": value, "unit": unit,
            "baseline": "the same pair with --dualpath-wait-all-layers, same run", "baseline_value": baseline_value,
            "ratio": value / baseline_value, "target": target,
            "command": "python benchmark/layerwise_bench.py " + " ".join(argv),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}"
                       + (f", {torch_device()}" if "--device" in argv else ""),
            "date": datetime.now(UTC).date().isoformat()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hit", type=int, default=2048, help="hit tokens per turn (a multiple of 64)")
    parser.add_argument("--new", type=int, default=512, help="new tokens per turn")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compute-gbps", type=float, default=1.0, help="emulated compute NIC (DE->PE KV)")
    parser.add_argument("--nic-gbps", type=float, default=40.0, help="emulated storage NICs")
    parser.add_argument("--base-port", type=int, default=23000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mla", action="store_true", help="the tiny DeepSeek-V2 (MLA) instead of the tiny Llama")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--server-args", default="", help="more SGLang flags for both servers (GPU runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the records go")
    args = parser.parse_args()
    if args.hit % 64:
        parser.error("--hit must be a multiple of the page size, 64")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as root:
        model = tiny_model_with_layers(Path(root) / "model", args.layers, TINY_MLA_MODEL if args.mla else TINY_MODEL)
        for arm, server_args in ARMS.items():
            print(f"{arm}:", flush=True)
            results[arm] = run_arm(Path(root) / arm, model, server_args, args)
    median = {arm: statistics.median(ttfts) for arm, ttfts in results.items()}
    print(f"\n{args.layers} layers ({'MLA' if args.mla else 'GQA'}, {args.device}), {args.hit} hit + {args.new} new "
          f"tokens, the DE's KV at {args.compute_gbps} Gb/s, {args.rounds} rounds, median TTFT")
    for arm, value in median.items():
        print(f"{arm:15} {value * 1e3:8.1f} ms")
    ratio = median["layer_by_layer"] / median["wait_for_all"]
    print(f"layer by layer / wait for all: {ratio:.3f} (target < 0.9)")
    records = [record("de_side_ttft_layer_by_layer", median["layer_by_layer"], "s (median TTFT)",
                      median["wait_for_all"], "ratio < 0.9 (paper: 0.828 of Basic's JCT)", sys.argv[1:])]
    args.out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"records in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
