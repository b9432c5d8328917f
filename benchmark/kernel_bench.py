"""KV copy kernels on a CUDA GPU: Full Blocks -> paged pool scatter (and the gather back) against raw copies.

In one run, for each model shape: pinned-host -> pool scatter against the measured pinned H2D copy
(target >= 90%), device -> pool scatter against a plain device-to-device copy of the same bytes
(target >= 80%), and both against the same scatter done with ``torch.index_copy_`` (the baseline to
beat); the gathers back are reported beside them. Results go to benchmark/results/kernel_bench.json.
Without CUDA it prints why it skipped and exits 0 without writing anything. See docs/kernels.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dualpath.kv import BlockBuffer, BlockLayout, get_geometry

try:
    import torch
    import triton.testing
    from dualpath_kernel import CopyConfig, PagedKVPool, block_range, gather_blocks, scatter_blocks
except ImportError as missing:  # the skip message names it
    MISSING: ImportError | None = missing
else:
    MISSING = None

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_bench.json"
POISON = 0xFF
# (geometry preset, page size): the first is the headline case and the one whose launch shape is swept.
CASES = [("llama-3-8b", 64), ("llama-3-8b", 16), ("deepseek-v3", 64), ("deepseek-v3.2", 64)]
SWEEP = [(tile, warps) for tile in (4096, 8192, 16384, 32768) for warps in (4, 8)]


class Row(NamedTuple):
    metric: str
    value: float
    baseline: str
    baseline_value: float
    target: str


def skip_reason() -> str | None:
    if MISSING is not None:
        return f"{MISSING.name} is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (the kernels' CPU correctness tests are test/test_kernels.py)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 would time Triton's CPU interpreter; unset it"
    return None


def gbps(nbytes: int, fn: Callable[[], object]) -> float:
    """Payload bytes per second (each byte counted once), median of event-timed repeats after warm-up."""
    milliseconds = triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")
    return nbytes / (milliseconds * 1e-3) / 1e9


def run_case(name: str, page_size: int, target_bytes: int, headline: bool) -> list[Row]:
    layout = BlockLayout(get_geometry(name), page_size)
    count = max(1, target_bytes // layout.full_block_bytes)
    shape = (count, *layout.shape)
    nbytes = count * layout.full_block_bytes
    pool = PagedKVPool.allocate(layout.geometry, 2 * count, page_size, "cuda")
    pages = torch.randperm(pool.pages)[:count]  # scattered, non-contiguous pages
    pinned = torch.randint(0, 256, shape, dtype=torch.uint8).pin_memory()
    device = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    spare = torch.empty_like(device)
    check_round_trip(pool, pages, pinned, device)

    def staged_index_copy() -> None:
        spare.copy_(pinned, non_blocking=True)
        scatter_blocks(spare, pool, pages, backend="torch")

    tag = f"[{name},page{page_size}]"
    h2d = gbps(nbytes, lambda: spare.copy_(pinned, non_blocking=True))
    d2h = gbps(nbytes, lambda: pinned.copy_(device, non_blocking=True))
    d2d = gbps(nbytes, lambda: spare.copy_(device))
    host_scatter = gbps(nbytes, lambda: scatter_blocks(pinned, pool, pages))
    device_scatter = gbps(nbytes, lambda: scatter_blocks(device, pool, pages))
    index_copy_host = gbps(nbytes, staged_index_copy)
    index_copy_device = gbps(nbytes, lambda: scatter_blocks(device, pool, pages, backend="torch"))
    host_gather = gbps(nbytes, lambda: gather_blocks(pool, pages, pinned))
    device_gather = gbps(nbytes, lambda: gather_blocks(pool, pages, spare))
    rows = [
        Row(f"kv_scatter_pinned_host_to_pool{tag}", host_scatter, "pinned H2D copy, same bytes", h2d, ">= 0.90"),
        Row(
            f"kv_scatter_pinned_host_to_pool_vs_index_copy{tag}",
            host_scatter,
            "pinned H2D stage + torch.index_copy_ per layer and K/V",
            index_copy_host,
            "> 1.0",
        ),
        Row(f"kv_scatter_device_to_pool{tag}", device_scatter, "device-to-device copy, same bytes", d2d, ">= 0.80"),
        Row(
            f"kv_scatter_device_to_pool_vs_index_copy{tag}",
            device_scatter,
            "torch.index_copy_ per layer and K/V",
            index_copy_device,
            "> 1.0",
        ),
        Row(f"kv_gather_pool_to_pinned_host{tag}", host_gather, "pinned D2H copy, same bytes", d2h, "diagnostic"),
        Row(f"kv_gather_pool_to_device{tag}", device_gather, "device-to-device copy, same bytes", d2d, "diagnostic"),
    ]
    if headline:
        rows += block_buffer_rows(layout, count, pool, pages, tag, h2d)
        rows += layer_first_rows(count, pool, pages, tag)
        for tile, warps in SWEEP:
            config = CopyConfig(tile, warps)
            shape_tag = f"[{name},page{page_size},tile{tile},warps{warps}]"
            value = gbps(nbytes, lambda config=config: scatter_blocks(pinned, pool, pages, config=config))
            rows.append(Row(f"kv_scatter_pinned_host_to_pool{shape_tag}", value, "pinned H2D copy", h2d, "sweep"))
            value = gbps(nbytes, lambda config=config: scatter_blocks(device, pool, pages, config=config))
            rows.append(Row(f"kv_scatter_device_to_pool{shape_tag}", value, "device-to-device copy", d2d, "sweep"))
    return rows


def block_buffer_rows(
    layout: BlockLayout, count: int, pool: PagedKVPool, pages: torch.Tensor, tag: str, h2d: float
) -> list[Row]:
    """The production staging path: a page-aligned ``BlockBuffer`` registered with CUDA, read in place."""
    buffer = BlockBuffer(layout, count)
    region = torch.from_numpy(buffer.region)
    region.copy_(torch.randint(0, 256, region.shape, dtype=torch.uint8))
    cudart = torch.cuda.cudart()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(region.data_ptr(), region.numel(), 0))
    except RuntimeError as error:
        print(f"kernel_bench: BlockBuffer row skipped, cudaHostRegister failed: {error}")
        return []
    try:
        blocks = block_range(buffer, 0, count)
        check_round_trip(pool, pages, blocks)
        value = gbps(count * layout.full_block_bytes, lambda: scatter_blocks(blocks, pool, pages))
    finally:
        torch.cuda.check_error(cudart.cudaHostUnregister(region.data_ptr()))
    return [Row(f"kv_scatter_block_buffer_to_pool{tag}", value, "pinned H2D copy, same bytes", h2d, ">= 0.90")]


def layer_first_rows(count: int, pool: PagedKVPool, pages: torch.Tensor, tag: str) -> list[Row]:
    """The prefill's launch per layer (``srt/layers.py``): one layer of SGLang ``layer_first`` pages, read from
    staging slots in any order in pinned memory, into scattered pool pages."""
    planes = torch.randint(0, 256, (count, pool.components * pool.layers, pool.page_size, pool.row_bytes),
                           dtype=torch.uint8).pin_memory()
    layer, slots = pool.layers // 2, torch.randperm(count)
    one_layer = planes.unflatten(1, (pool.components, pool.layers))[:, :, layer : layer + 1]
    scatter_blocks(one_layer, pool, pages, slots=slots, first_layer=layer)
    for component in range(pool.components):
        placed = pool.page_rows(layer, component)[pages.to(pool.device)].cpu()
        if not torch.equal(placed, planes[slots, component * pool.layers + layer]):
            raise SystemExit("kernel scatter of layer_first slots does not match the staged planes")
    nbytes = count * pool.page_size * pool.token_bytes
    source = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d = gbps(nbytes, lambda: target.copy_(source, non_blocking=True))
    value = gbps(nbytes, lambda: scatter_blocks(one_layer, pool, pages, slots=slots, first_layer=layer))
    return [Row(f"kv_scatter_layer_first_slots_to_pool{tag}", value, "pinned H2D copy of one layer's bytes", h2d,
                ">= 0.80")]


def check_round_trip(pool: PagedKVPool, pages: torch.Tensor, *staged_blocks: torch.Tensor) -> None:
    """Fail loudly before timing if a kernel result differs from the staged bytes (poisoned targets)."""
    for staged in staged_blocks:
        for parts in pool.buffers:
            for buffer in parts:
                buffer.view(torch.uint8).fill_(POISON)
        scatter_blocks(staged, pool, pages)
        back = torch.full(tuple(staged.shape), POISON, dtype=torch.uint8, device="cuda")
        gather_blocks(pool, pages, back)
        untouched = torch.ones(pool.pages, dtype=torch.bool, device=pool.device)
        untouched[pages.to(pool.device)] = False
        written_once = all(
            bool((pool.page_rows(layer, component)[untouched] == POISON).all())
            for layer in range(pool.layers)
            for component in range(pool.components)
        )
        if not (written_once and torch.equal(back.cpu(), staged.cpu())):
            raise SystemExit(f"kernel scatter/gather from {staged.device} does not match the staged blocks")


def machine() -> str:
    name = torch.cuda.get_device_name()
    return f"{name}, {platform.machine()}, torch {torch.__version__}, triton {triton.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="staged bytes per case (MiB)")
    parser.add_argument(
        "--no-sweep", action="store_true", help="skip the BlockBuffer row and the launch-shape sweep (faster)"
    )
    args = parser.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"kernel_bench: skipped, {reason}; nothing written.")
        return 0
    command = " ".join(["python3 benchmark/kernel_bench.py", *(argv if argv is not None else sys.argv[1:])])
    rows = [
        row
        for index, (name, page_size) in enumerate(CASES)
        for row in run_case(name, page_size, args.mib << 20, headline=index == 0 and not args.no_sweep)
    ]
    records = [
        {
            "metric": row.metric,
            "value": row.value,
            "unit": "GB/s",
            "baseline": row.baseline,
            "baseline_value": row.baseline_value,
            "ratio": row.value / row.baseline_value,
            "target": row.target,
            "command": command,
            "machine": machine(),
            "date": datetime.date.today().isoformat(),
        }
        for row in rows
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(records, indent=2) + "\n")
    print(f"{'metric':<76} {'GB/s':>8} {'base':>8} {'ratio':>6}  target")
    for row in rows:
        ratio = row.value / row.baseline_value
        print(f"{row.metric:<76} {row.value:8.1f} {row.baseline_value:8.1f} {ratio:6.2f}  {row.target}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
