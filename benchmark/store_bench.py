"""The store's batched reads against raw O_DIRECT reads, and the NIC cap's accuracy.

Both sides read the same bytes from the same file system in one run, alternating rounds so that drift in
the disk affects them alike; the ratio is what counts. The NIC check runs two processes on one node
name and measures what they receive together in every whole second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from dualpath.kv import BlockBuffer, aligned_empty, block_keys
from dualpath.kv.layout import round_up
from dualpath.store.config import StoreConfig
from dualpath.store.io import supports_direct_io
from dualpath.store.store import BlockStatus, BlockStore

GB = 1e9


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".dualpath-bench"),
                        help="scratch directory on the file system to measure (removed afterwards)")
    parser.add_argument("--model", default="deepseek-v3")
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=384, help="Full Blocks per read round")
    parser.add_argument("--batch-blocks", type=int, default=64,
                        help="Full Blocks per store read call (64 x 64 tokens: one 4,096-token prefix)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--io-threads", type=int, default=8)
    parser.add_argument("--nic-fraction", type=float, default=0.5,
                        help="emulated NIC rate as a fraction of the measured raw read rate")
    parser.add_argument("--nic-seconds", type=float, default=4.0)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["python", "benchmark/store_bench.py", *argv])  # what the records say made them
    return run(args)


def _say(message: str) -> None:
    print(message, flush=True)


def _raw_read(path: Path, destinations: list[np.ndarray], total: int) -> float:
    """Read ``total`` bytes of ``path`` sequentially, one O_DIRECT read per destination buffer in turn."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        start = time.perf_counter()
        offset, turns = 0, itertools.cycle(destinations)
        while offset < total:
            destination = next(turns)
            nread = os.preadv(fd, [destination[: min(destination.nbytes, round_up(total - offset))]], offset)
            if nread == 0:
                raise RuntimeError(f"{path} ended at {offset} of {total} bytes")
            offset += nread
        return total / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _store_read(store: BlockStore, keys: list[str], buffers: BlockBuffer) -> float:
    """Read ``keys`` in batches of half the buffer, the next batch queued while the last one completes."""
    half = buffers.capacity // 2
    halves = [buffers.blocks(range(half)), buffers.blocks(range(half, 2 * half))]
    start = time.perf_counter()
    pending: list = []
    for batch, first in enumerate(range(0, len(keys), half)):
        part = keys[first : first + half]
        submitted = store.submit_read(part, halves[batch % 2][: len(part)])
        _expect_ok([f.result() for f in pending])
        pending = submitted
    _expect_ok([f.result() for f in pending])
    return len(keys) * store.layout.full_block_bytes / (time.perf_counter() - start)


def _expect_ok(statuses: list[BlockStatus]) -> None:
    if statuses.count(BlockStatus.OK) != len(statuses):
        raise RuntimeError(f"store read failed: {statuses}")


def _nic_reader(config: StoreConfig, keys: list[str], until_ns: int, queue) -> None:
    store = BlockStore(config)
    buffers = BlockBuffer(store.layout, 4)
    done: list[tuple[int, int]] = []
    try:
        while time.monotonic_ns() < until_ns:
            for first in range(0, len(keys), 4):
                futures = store.submit_read(keys[first : first + 4], buffers.blocks(range(4)))
                for future in futures:
                    future.result()
                    done.append((time.monotonic_ns(), store.format.file_bytes))
                if time.monotonic_ns() >= until_ns:
                    break
    finally:
        store.close()
        queue.put(done)


def _nic_windows(config: StoreConfig, keys: list[str], seconds: float, processes: int) -> list[float]:
    """Bytes per second received by ``processes`` readers of one node, for each whole second."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    start_ns = time.monotonic_ns() + 2 * 10**9  # leave time for the readers to start
    until_ns = start_ns + int(seconds * 1e9)
    readers = [context.Process(target=_nic_reader, args=(config, keys, until_ns, queue)) for _ in range(processes)]
    for reader in readers:
        reader.start()
    events = sorted(e for _ in readers for e in queue.get(timeout=seconds + 120))
    for reader in readers:
        reader.join(60)
    first = next(t for t, _ in events if t >= start_ns)  # the stream is established from here
    windows = int((until_ns - first) // 10**9)
    totals = [0.0] * windows
    for t, nbytes in events:
        index = (t - first) // 10**9
        if t > first and index < windows:
            totals[index] += nbytes
    return totals


def _machine(directory: Path) -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}, dir {directory}"


def run(args: argparse.Namespace) -> int:
    if args.nic_seconds < 2 or args.blocks < 2 or args.rounds < 1 or args.batch_blocks < 1:
        print("error: need --nic-seconds >= 2 (whole windows), --blocks >= 2, --batch-blocks >= 1 and --rounds >= 1",
              file=sys.stderr)
        return 2
    scratch = args.dir.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    if not supports_direct_io(scratch):
        print(f"error: {scratch} does not support O_DIRECT; pass --dir on a disk-backed file system", file=sys.stderr)
        return 2
    try:
        return _run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(args: argparse.Namespace, scratch: Path) -> int:
    config = StoreConfig(root=scratch / "store", model=args.model, block_tokens=args.block_tokens,
                         io_threads=args.io_threads, node="bench")
    store = BlockStore(config)
    block_bytes = store.layout.full_block_bytes
    total = args.blocks * block_bytes
    _say(f"store bench: {args.blocks} x {block_bytes / 1e6:.2f} MB Full Blocks ({args.model}, "
         f"{args.block_tokens} tokens) = {total / GB:.2f} GB per round, {args.rounds} rounds, dir {scratch}")
    keys = block_keys(np.arange(args.blocks * args.block_tokens), args.block_tokens)
    buffers = BlockBuffer(store.layout, 2 * min(args.blocks, args.batch_blocks))
    rng = np.random.default_rng(0)
    for block in buffers.blocks(range(buffers.capacity)):
        block[:] = rng.integers(0, 256, block.shape, dtype=np.uint8)
    _say("writing the store's blocks and the raw file ...")
    raw_path = scratch / "raw.bin"
    fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for first in range(0, args.blocks, buffers.capacity):
            part = keys[first : first + buffers.capacity]
            _expect_ok(store.write(part, buffers.blocks(range(len(part)))))
            for block in buffers.blocks(range(len(part))):
                os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    # The raw read lands in the store's destination buffers: a virtual disk's DMA into hundreds of MB of
    # memory runs well below its DMA into one hot buffer, and no caller keeps its data in one buffer.
    stride = buffers.stride
    destinations = [buffers.region[i * stride : (i + 1) * stride] for i in range(buffers.capacity)]
    hot = [aligned_empty(stride)]
    raw, raw_hot, ours = [], [], []
    measures = [lambda: raw.append(_raw_read(raw_path, destinations, total)),
                lambda: raw_hot.append(_raw_read(raw_path, hot, total)),
                lambda: ours.append(_store_read(store, keys, buffers))]
    for round_ in range(args.rounds):
        # Alternate the order (ABC, CBA, ...) so that drift in the disk's state treats every side alike.
        for measure in measures if round_ % 2 == 0 else measures[::-1]:
            measure()
        _say(f"  round {round_ + 1}/{args.rounds}: raw sequential {raw[-1] / GB:.3f} GB/s, "
             f"into one hot buffer {raw_hot[-1] / GB:.3f} GB/s, store {ours[-1] / GB:.3f} GB/s "
             f"(ratio {ours[-1] / raw[-1]:.3f})")
    store.close()
    raw_rate, hot_rate, store_rate = (statistics.median(x) for x in (raw, raw_hot, ours))

    nic_rate = args.nic_fraction * raw_rate
    nic_keys = keys[: max(8, args.blocks // 4)]
    _say(f"emulated NIC: 2 processes on one node, cap {nic_rate / GB:.3f} GB/s, {args.nic_seconds:.0f} s ...")
    nic_config = StoreConfig(root=config.root, model=args.model, block_tokens=args.block_tokens, node="bench-nic",
                             nic_gbps=nic_rate * 8 / GB, io_threads=args.io_threads)
    windows = _nic_windows(nic_config, nic_keys, args.nic_seconds, processes=2)
    worst = max(windows, key=lambda w: abs(w - nic_rate))

    print()
    print(f"{'metric':<36}{'value':>12}{'baseline':>12}{'ratio':>8}  target")
    print(f"{'store batched read (GB/s)':<36}{store_rate / GB:>12.3f}{raw_rate / GB:>12.3f}"
          f"{store_rate / raw_rate:>8.3f}  >= 0.90 of raw O_DIRECT sequential read")
    print(f"{'  same, vs raw into one hot buffer':<36}{store_rate / GB:>12.3f}{hot_rate / GB:>12.3f}"
          f"{store_rate / hot_rate:>8.3f}  (diagnostic: the disk's DMA into one reused buffer)")
    print(f"{'NIC cap, worst 1 s window (GB/s)':<36}{worst / GB:>12.3f}{nic_rate / GB:>12.3f}"
          f"{worst / nic_rate:>8.3f}  within 0.95-1.05 of the cap")
    print("  every window:", ", ".join(f"{w / nic_rate:.3f}" for w in windows))
    common = {"command": args.command_line, "machine": _machine(scratch),
              "date": datetime.now(UTC).date().isoformat()}
    records = [
        {"metric": "store_batched_read_throughput", "value": store_rate / GB, "unit": "GB/s",
         "baseline": "raw O_DIRECT sequential read, same bytes, same file system, into the same buffers",
         "baseline_value": raw_rate / GB,
         "ratio": store_rate / raw_rate, "target": ">= 0.90", **common},
        {"metric": "store_batched_read_throughput_vs_hot_buffer", "value": store_rate / GB, "unit": "GB/s",
         "baseline": "raw O_DIRECT sequential read, same bytes, all into one reused buffer",
         "baseline_value": hot_rate / GB, "ratio": store_rate / hot_rate, "target": "diagnostic", **common},
        {"metric": "emulated_nic_worst_1s_window", "value": worst / GB, "unit": "GB/s",
         "baseline": "configured NIC cap (2 processes, one node)", "baseline_value": nic_rate / GB,
         "ratio": worst / nic_rate, "target": "0.95 - 1.05", **common},
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "store_bench.json"
    out.write_text(json.dumps(records, indent=2) + "\n")
    _say(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
