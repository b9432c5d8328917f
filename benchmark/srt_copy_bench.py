"""What hit KV costs to move in DualPath's SGLang backend: bytes copied per byte of hit KV and CPU seconds per GB.

Run: ``python benchmark/srt_copy_bench.py [--pages N] [--rounds R]``. In one process, on SGLang's real MHA pool
classes (CPU), a decode backend writes a host pool's pages to the store; then a prefill backend reads them
into its own host pool and the forward's per-layer loads take them into its device pool, alternately on the
PE path (its NIC: store -> slot -> host pool -> device) and on the DE path (the decode's NIC: store -> DE slot,
NIXL -> PE slot -> device for the layers still landing when the forward asks for them, -> host pool -> device
for those that landed before; the host pool gets every page). Copies are counted from what the servers report
(pages read from the store by either node, bytes forwarded DE -> PE, pages placed in the host pool, layers
the forward took from the slots), not assumed; CPU time is the whole process's (every thread: store readers,
NIXL, the KV channel). Prints a table and writes ``benchmark/results/srt_copy_bench.json`` (DE path vs PE path,
same run)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from dualpath.kv import block_keys
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.srt import cpu, layers, surface
from dualpath.srt.config import ENV, SrtConfig, free_ports
from dualpath.srt.state import PUBLISH_PERIOD_S, ServerReporter

RESULTS = Path(__file__).parent / "results" / "srt_copy_bench.json"
PAGE, LAYERS, HEADS, HEAD_DIM = 64, 4, 4, 64  # 512 KiB float32 pages
SGLANG_LOAD = functools.partial(cpu.load_to_device_per_layer, None)  # host -> device, as the hook chain passes it


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def backend(role: str, node: str, root: Path, pages: int) -> object:
    """A DualPath storage backend over a fresh SGLang MHA host pool of ``pages`` pages (plus one)."""
    from dualpath.srt.storage import DualPathStorage
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    device = MHATokenToKVPool(PAGE * (pages + 1), PAGE, torch.float32, HEADS, HEAD_DIM, LAYERS, "cpu", False)
    host = MHATokenToKVPoolHost(device, 1.0, 0, PAGE, "layer_first", pin_memory=False, device="cpu")
    config = SrtConfig(role, node, str(root), "127.0.0.1", free_ports("127.0.0.1"), staging_blocks=pages + 8,
                       timeout_s=30.0, page_size=PAGE)
    os.environ[ENV] = config.to_env()
    storage = DualPathStorage(HiCacheStorageConfig(0, 1, 0, 1, 0, 1, False, False, False, "bench"))
    storage.register_mem_pool_host(host)
    return storage


def measure(prefill: object, decode: object, hint: RouteHint, rid: str, keys: list[str], ids: list[int],
            indices: torch.Tensor) -> dict[str, float]:
    """One read of every page into the prefill's host pool; what it copied and what it cost."""
    reporters = [ServerReporter(b.config) for b in (prefill, decode)]
    before = [r.report() for r in reporters]
    prefill.slots.forget()
    decode.slots.forget()
    used, wall = process_cpu_seconds(), time.perf_counter()
    prefill.routes.arrive(rid, None, hint.encode(), ids)
    placed = sum(prefill.routes.serving(rid, lambda: prefill.batch_get_v1(keys, indices)))
    device = surface.device_pool_of(prefill.pool)
    for layer in range(LAYERS):  # the forward: SGLang's per-layer loads, then each layer's wait before attention
        layers.on_load(SGLANG_LOAD, prefill.pool, device, indices, indices, layer, "direct")
        device.get_key_buffer(layer)
    prefill.gate.settle(indices)  # DE pages enter the host pool once landed, after batch_get_v1 returned
    used, wall = process_cpu_seconds() - used, time.perf_counter() - wall
    if placed != len(keys):
        raise RuntimeError(f"{rid}: {placed} of {len(keys)} pages placed")
    time.sleep(3 * PUBLISH_PERIOD_S)  # the counters reach the reports a few times a second
    after = [r.report() for r in reporters]
    page_bytes = prefill.store.layout.full_block_bytes
    read_pages = sum(a.pages_read - b.pages_read for a, b in zip(after, before, strict=True))
    forwarded = after[1].bytes_forwarded - before[1].bytes_forwarded
    hit = len(keys) * page_bytes
    from_slots = (after[0].layers_from_slots - before[0].layers_from_slots) / (len(keys) * LAYERS)
    copies = (read_pages * page_bytes + forwarded + placed * page_bytes) / hit
    return {"copies_per_byte": copies + 1, "to_device": copies + 1 - from_slots, "from_slots": from_slots,
            "cpu_s_per_gb": used / (hit / 1e9), "gb_per_s": hit / 1e9 / wall, "de_share": forwarded / hit}


def record(metric: str, value: float, unit: str, baseline_value: float, target: str) -> dict:
    return {"metric": metric, "value": value, "unit": unit, "baseline": "the PE path (the prefill's own NIC), same run",
            "baseline_value": baseline_value, "ratio": value / baseline_value if baseline_value else None,
            "target": target, "command": "python benchmark/srt_copy_bench.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "date": datetime.now(UTC).date().isoformat()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=128, help="pages per read (512 KiB each)")
    parser.add_argument("--rounds", type=int, default=5, help="reads per path, alternating")
    args = parser.parse_args()
    ids = list(range(1, args.pages * PAGE + 1))
    keys = block_keys(ids, PAGE)
    indices = torch.arange(PAGE, PAGE * (args.pages + 1))
    with tempfile.TemporaryDirectory() as root:
        decode = backend("decode", "de0", Path(root), args.pages)
        prefill = backend("prefill", "pe0", Path(root), args.pages)
        try:
            generator = torch.Generator().manual_seed(0)
            for page in range(args.pages):
                flat = torch.randn(surface.host_page(decode.pool, 0).numel(), generator=generator)
                surface.set_host_page(decode.pool, PAGE * (page + 1), flat)
            if decode.batch_set_v1(keys, indices) != [True] * args.pages:
                raise RuntimeError("the decode could not write the pages")
            hints = {"pe": RouteHint(ReadSide.PE),
                     "de": RouteHint(ReadSide.DE, prefill.config.kv_channel, decode.config.kv_channel)}
            runs: dict[str, list[dict[str, float]]] = {side: [] for side in hints}
            for round_ in range(args.rounds):
                for side, hint in hints.items():
                    runs[side].append(measure(prefill, decode, hint, f"{side}{round_}", keys, ids, indices))
        finally:
            prefill.close()
            decode.close()
    median = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    mib = args.pages * prefill.store.layout.full_block_bytes / 2**20
    print(f"{args.pages} pages of {PAGE} tokens ({mib:.0f} MiB of hit KV) per read, {args.rounds} reads per path, "
          "medians")
    print(f"{'path':6} {'copies/byte':>12} {'to device':>10} {'from slots':>11} {'CPU s/GB':>9} {'GB/s':>6} "
          f"{'via DE':>7}")
    for side, m in median.items():
        print(f"{side:6} {m['copies_per_byte']:12.2f} {m['to_device']:10.2f} {m['from_slots']:11.0%} "
              f"{m['cpu_s_per_gb']:9.2f} {m['gb_per_s']:6.2f} {m['de_share']:7.0%}")
    pe, de = median["pe"], median["de"]
    records = [record("de_path_copies_per_byte", de["copies_per_byte"], "bytes copied / byte of hit KV, store to "
                      "device pool", pe["copies_per_byte"], "must not grow"),
               record("de_path_copies_to_device", de["to_device"], "copies on the way store -> device pool, per "
                      "byte", pe["to_device"], "one fewer than through the host pool for layers still landing"),
               record("de_path_cpu_s_per_gb", de["cpu_s_per_gb"], "CPU s per GB of hit KV", pe["cpu_s_per_gb"],
                      "must not grow"),
               record("de_path_throughput", de["gb_per_s"], "GB/s (one process, no NIC cap)", pe["gb_per_s"], "")]
    RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    print(f"records in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
