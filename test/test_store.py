from __future__ import annotations

import errno
import importlib
import json
import multiprocessing as mp
import os
import shutil
import threading
from pathlib import Path

import hf3fs_fake
import numpy as np
import pytest
from dualpath.kv import BlockBuffer, aligned_empty, block_keys
from dualpath.store import BlockStatus, BlockStore, StoreConfig
from dualpath.store.io import PosixIO
from dualpath.store.node import NodeState

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "benchmark"

OK, MISS, CORRUPT, EXISTS = BlockStatus.OK, BlockStatus.MISS, BlockStatus.CORRUPT, BlockStatus.EXISTS
SPAWN = mp.get_context("spawn")


@pytest.fixture
def root(tmp_path_factory) -> Path:
    # pytest's tmp_path lives on the root file system here, which supports O_DIRECT.
    return tmp_path_factory.mktemp("store")


def open_store(root: Path, **overrides) -> BlockStore:
    options = {"model": "tiny", "block_tokens": 16, "io_threads": 4, **overrides}
    return BlockStore(StoreConfig(root=root, **options))


def fill(buffer: BlockBuffer, count: int, seed: int) -> list[np.ndarray]:
    blocks = buffer.blocks(range(count))
    rng = np.random.default_rng(seed)
    for block in blocks:
        block[:] = rng.integers(0, 256, block.shape, dtype=np.uint8)
    return blocks


def poisoned(store: BlockStore, count: int) -> BlockBuffer:
    out = BlockBuffer(store.layout, count)
    out.region[:] = 0xA5
    return out


def keys_for(count: int, block_tokens: int = 16, salt: int = 0) -> list[str]:
    return block_keys(np.arange(count * block_tokens) + salt * 1_000_000, block_tokens)


def block_path(store: BlockStore, key: str) -> Path:
    return store.blocks_dir / key[:2] / f"{key}.kv"


@pytest.mark.parametrize(
    ("model", "block_tokens"),
    [("tiny", 16), ("tiny", 3), ("deepseek-v3", 16), ("deepseek-v3", 64)],
    ids=["whole-pages", "tail-only", "pages-plus-tail", "deepseek-v3-64"],
)
def test_round_trip_is_byte_exact(root, model, block_tokens):
    with open_store(root, model=model, block_tokens=block_tokens) as store:
        assert store.io.direct
        source = BlockBuffer(store.layout, 3)
        blocks = fill(source, 3, seed=block_tokens)
        keys = keys_for(3, block_tokens)
        assert store.write(keys, blocks) == [OK] * 3
        out = poisoned(store, 3)
        assert store.read(keys, out.blocks(range(3))) == [OK] * 3
        for got, want in zip(out.blocks(range(3)), blocks, strict=True):
            np.testing.assert_array_equal(got, want)
        assert store.stats().hits == 3


def test_prefix_length_counts_leading_keys_only(root):
    with open_store(root) as store:
        keys = keys_for(5)
        source = BlockBuffer(store.layout, 5)
        store.write([keys[0], keys[1], keys[3]], fill(source, 3, seed=1))
        assert store.prefix_length(keys) == 2
        assert store.prefix_length([]) == 0
        assert store.delete([*keys[:1], "absent"]) == 1
        assert store.prefix_length(keys) == 0


def test_unknown_key_reads_as_miss(root):
    with open_store(root) as store:
        out = poisoned(store, 1)
        assert store.read(keys_for(1), out.blocks([0])) == [MISS]
        assert store.stats().misses == 1
        assert store.read_queue().pending_tokens == 0


def test_bad_arguments_raise_and_change_nothing(root):
    with open_store(root) as store:
        keys = keys_for(2)
        buffer = BlockBuffer(store.layout, 2)
        good = fill(buffer, 2, seed=2)
        store.write(keys[:1], good[:1])
        before = sorted(p.name for p in store.blocks_dir.rglob("*"))
        nbytes = store.layout.full_block_bytes
        misaligned = aligned_empty(nbytes + 64)[64:]
        read_only = aligned_empty(nbytes)
        read_only.flags.writeable = False
        cases = [
            (store.read, [keys[0]], [aligned_empty(nbytes - 1)], "bytes"),
            (store.read, [keys[0]], [misaligned], "aligned"),
            (store.read, [keys[0]], [read_only], "read-only"),
            (store.read, ["../escape"], [good[1]], "invalid block key"),
            (store.read, keys, [good[1]], "2 keys but 1 buffers"),
            (store.read, keys, [good[1], good[1]], "twice"),
            (store.write, [keys[1], keys[1]], good, "twice"),
            (store.write, [keys[1]], [misaligned], "aligned"),
        ]
        for call, batch_keys, buffers, message in cases:
            with pytest.raises(ValueError, match=message):
                call(batch_keys, buffers)
        assert sorted(p.name for p in store.blocks_dir.rglob("*")) == before
        assert store.read_queue().pending_tokens == 0
        out = poisoned(store, 1)
        assert store.read(keys[:1], out.blocks([0])) == [OK]
        np.testing.assert_array_equal(out.block(0), good[0])


def block_location(store: BlockStore, key: str) -> tuple[Path, int]:
    segment, offset = block_path(store, key).read_text().split()
    return store.segments_dir / segment, int(offset)


def corrupt_data(store: BlockStore, key: str) -> None:
    path, offset = block_location(store, key)
    with open(path, "r+b") as f:
        f.seek(offset + 4096 + 100)
        byte = f.read(1)
        f.seek(offset + 4096 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def corrupt_header(store: BlockStore, key: str) -> None:
    path, offset = block_location(store, key)
    with open(path, "r+b") as f:
        f.seek(offset + 9)
        f.write(b"\x7f")


def truncate(store: BlockStore, key: str) -> None:
    path, offset = block_location(store, key)
    os.truncate(path, offset + store.format.file_bytes - 4096)


def garble_entry(store: BlockStore, key: str) -> None:
    block_path(store, key).write_text("not an entry")


@pytest.mark.parametrize("damage", [corrupt_data, corrupt_header, truncate, garble_entry])
def test_damaged_block_is_a_counted_miss_and_is_removed(root, damage):
    with open_store(root) as store:
        keys = keys_for(2)
        source = BlockBuffer(store.layout, 2)
        blocks = fill(source, 2, seed=3)
        store.write(keys, blocks)
        damage(store, keys[1])
        usage = store.usage()
        out = poisoned(store, 2)
        assert store.read(keys, out.blocks(range(2))) == [OK, CORRUPT]
        np.testing.assert_array_equal(out.block(0), blocks[0])
        assert store.stats().corrupt == 1
        assert store.prefix_length(keys) == 1
        assert store.usage() == usage - store.format.file_bytes
        assert store.read_queue().read_tokens == 16  # only the intact block counts as delivered
        assert store.write(keys[1:], blocks[1:]) == [OK]  # the key can be written again


def test_block_under_another_keys_name_is_corrupt(root):
    with open_store(root) as store:
        keys = keys_for(2)
        store.write(keys[:1], fill(BlockBuffer(store.layout, 1), 1, seed=4))
        os.makedirs(block_path(store, keys[1]).parent, exist_ok=True)
        os.link(block_path(store, keys[0]), block_path(store, keys[1]))
        assert store.read(keys[1:], poisoned(store, 1).blocks([0])) == [CORRUPT]


def die_mid_write(root: Path, keys: list[str]) -> None:
    """Publish ``keys[:-1]``, then die while appending the last one."""
    store = open_store(root)
    blocks = fill(BlockBuffer(store.layout, len(keys)), len(keys), seed=5)
    assert store.write(keys[:-1], blocks[:-1]) == [OK] * (len(keys) - 1)

    def half_then_die(self, fd, buffers, offset):
        os.pwritev(fd, buffers[:1], offset)  # the header reaches the disk, the data never does
        os._exit(3)

    PosixIO.writev = half_then_die
    store.write(keys[-1:], blocks[-1:])


def segment_files(store: BlockStore) -> list[str]:
    return sorted(p.name for p in store.segments_dir.iterdir())


@pytest.mark.parametrize("published", [0, 2])
def test_crash_in_the_middle_of_a_write_leaves_no_visible_block(root, published):
    keys = keys_for(published + 1)
    child = SPAWN.Process(target=die_mid_write, args=(root, keys))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    segments = root / "tiny-16t" / "segments"
    assert len(list(segments.iterdir())) == 1  # the dead writer's segment, torn at its end
    with open_store(root) as store:
        assert store.prefix_length(keys) == published
        statuses = store.read(keys, poisoned(store, len(keys)).blocks(range(len(keys))))
        assert statuses == [OK] * published + [MISS]
        # Reclaimed at start-up: the whole segment if nothing in it was published, else its torn tail.
        assert len(segment_files(store)) == (1 if published else 0)
        assert store.delete(keys) == published
        assert segment_files(store) == []  # its last block freed: the (sealed) segment goes too
        assert list(store.tmp_dir.iterdir()) == []


def test_full_disk_fails_the_write_cleanly(root, monkeypatch):
    with open_store(root) as store:
        def no_space(self, fd, buffers, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PosixIO, "writev", no_space)
        keys = keys_for(2)
        assert store.write(keys, fill(BlockBuffer(store.layout, 2), 2, seed=6)) == [BlockStatus.NO_SPACE] * 2
        assert store.prefix_length(keys) == 0
        assert list(store.tmp_dir.iterdir()) == []
        assert store.usage() == 0
        assert store.stats().write_failures == 2


def write_same_key(root: Path, key: str, seed: int, start, results) -> None:
    store = open_store(root)
    block = fill(BlockBuffer(store.layout, 1), 1, seed=seed)
    start.wait()
    results.put(store.write([key], block)[0].value)
    store.close()


def test_concurrent_writers_of_one_key_publish_exactly_one_intact_copy(root):
    key = keys_for(1)[0]
    start, results = SPAWN.Event(), SPAWN.Queue()
    writers = [SPAWN.Process(target=write_same_key, args=(root, key, seed, start, results)) for seed in range(4)]
    for writer in writers:
        writer.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in writers)
    for writer in writers:
        writer.join(60)
    assert outcomes.count("ok") == 1 and outcomes.count("exists") == 3
    with open_store(root) as store:
        out = poisoned(store, 1)
        assert store.read([key], out.blocks([0])) == [OK]
        copies = [fill(BlockBuffer(store.layout, 1), 1, seed=s)[0] for s in range(4)]
        assert sum(np.array_equal(out.block(0), c) for c in copies) == 1
        assert store.usage() == store.format.file_bytes


def write_then_read_peers(root: Path, rank: int, peers: int, start, results) -> None:
    store = open_store(root, node=f"node{rank % 2}")
    keys = keys_for(6, salt=rank)
    store.write(keys, fill(BlockBuffer(store.layout, 6), 6, seed=rank))
    start.wait()
    mismatches = 0
    for peer in range(peers):
        out = BlockBuffer(store.layout, 6)
        statuses = store.read(keys_for(6, salt=peer), out.blocks(range(6)))
        expected = fill(BlockBuffer(store.layout, 6), 6, seed=peer)
        mismatches += sum(s is not OK or not np.array_equal(o, e)
                          for s, o, e in zip(statuses, out.blocks(range(6)), expected, strict=True))
    results.put(mismatches)
    store.close()


def test_processes_read_each_others_blocks(root):
    peers = 4
    start, results = SPAWN.Barrier(peers), SPAWN.Queue()
    workers = [SPAWN.Process(target=write_then_read_peers, args=(root, r, peers, start, results)) for r in range(peers)]
    for worker in workers:
        worker.start()
    assert [results.get(timeout=120) for _ in workers] == [0] * peers
    for worker in workers:
        worker.join(60)
    with open_store(root, node="node0") as store:
        # Two processes per node, each read 4 x 6 blocks of 16 tokens through its node.
        assert store.read_queue().read_tokens == 2 * peers * 6 * 16


def test_capacity_evicts_least_recently_read(root):
    with open_store(root) as store:
        size = store.format.file_bytes
    with open_store(root, capacity_bytes=4 * size, evict_to_fraction=1.0) as store:
        keys = keys_for(5)
        blocks = fill(BlockBuffer(store.layout, 5), 5, seed=7)
        assert store.write(keys[:4], blocks[:4]) == [OK] * 4
        for age, key in enumerate(keys[:4]):  # distinct, old write times: block 0 oldest
            os.utime(block_path(store, key), ns=(10**9 * (age + 1),) * 2)
        assert store.read(keys[:1], poisoned(store, 1).blocks([0])) == [OK]  # block 0 becomes the newest
        assert store.write(keys[4:], blocks[4:]) == [OK]
        assert [store.prefix_length([k]) for k in keys] == [1, 0, 1, 1, 1]
        assert store.usage() == 4 * size
        assert store.stats().evicted_blocks == 1


def test_capacity_recounts_after_drift_and_refuses_oversized_blocks(root):
    with open_store(root) as store:
        size = store.format.file_bytes
        keys = keys_for(3)
        store.write(keys, fill(BlockBuffer(store.layout, 3), 3, seed=8))
        block_path(store, keys[0]).unlink()  # removed behind the store's back: usage now overstates
        assert store.usage() == 3 * size
        assert store.evict(10 * size).blocks == 0
        assert store.usage() == 2 * size
    with open_store(root, capacity_bytes=size // 2) as store:
        more = keys_for(1, salt=9)
        assert store.write(more, fill(BlockBuffer(store.layout, 1), 1, seed=9)) == [BlockStatus.NO_SPACE]


def test_node_state_follows_the_store_not_its_path_or_inode(root):
    with open_store(root) as store:
        keys = keys_for(2)
        store.write(keys, fill(BlockBuffer(store.layout, 2), 2, seed=11))
        store.read(keys, poisoned(store, 2).blocks(range(2)))
        alias = root.parent / f"{root.name}-alias"
        alias.symlink_to(root)
        with open_store(alias) as same:  # another path to the same store: the same node
            assert same.read_queue().read_tokens == 2 * 16
        alias.unlink()
    for path in root.iterdir():  # the store is deleted and recreated in place, maybe at the same inode
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open_store(root) as fresh:
        assert fresh.read_queue().read_tokens == 0


def test_nic_reservations_are_shared_by_a_node_and_strict(root):
    rate = 1e6
    first = NodeState(root / "nodes", "n0", rate)
    second = NodeState(root / "nodes", "n0", None)  # another handle on the node inherits its rate
    other = NodeState(root / "nodes", "n1", None)
    try:
        a = first.reserve(500_000)
        b = second.reserve(250_000)
        assert a.finish_ns - a.start_ns == 500_000_000
        assert b.start_ns == a.finish_ns and b.finish_ns - b.start_ns == 250_000_000
        assert other.rate_bytes_per_s is None
        assert other.reserve(10**9).finish_ns - other.reserve(10**9).start_ns < 10**8
    finally:
        for node in (first, second, other):
            node.close()


def gate_reads(monkeypatch) -> tuple[threading.Event, threading.Semaphore, list[int]]:
    """Hold every PosixIO read until the gate opens; ``entered`` counts reads waiting, ``sizes`` their bytes."""
    gate, entered, sizes = threading.Event(), threading.Semaphore(0), []
    real_readv = PosixIO.readv

    def gated_readv(self, fd, buffers, offset):
        sizes.append(sum(b.nbytes for b in buffers))
        entered.release()
        gate.wait(30)
        return real_readv(self, fd, buffers, offset)

    monkeypatch.setattr(PosixIO, "readv", gated_readv)
    return gate, entered, sizes


@pytest.mark.parametrize("adjacent", [False, True], ids=["one-io-per-block", "merged"])
def test_read_queue_tracks_queued_and_inflight_reads(root, monkeypatch, adjacent):
    with open_store(root, io_threads=2) as store:
        keys, fillers = keys_for(5), keys_for(5, salt=1)
        # Interleaved with fillers, the blocks are not adjacent: five I/Os, two threads.
        batch = keys if adjacent else [k for pair in zip(keys, fillers, strict=True) for k in pair]
        store.write(batch, fill(BlockBuffer(store.layout, len(batch)), len(batch), seed=10))
        gate, entered, _ = gate_reads(monkeypatch)
        futures = store.submit_read(keys, poisoned(store, 5).blocks(range(5)))
        for _ in range(1 if adjacent else 2):
            entered.acquire(timeout=30)
        queue = store.read_queue()
        # A merged run is in flight as a whole; separate blocks wait for a thread.
        inflight = 5 if adjacent else 2
        assert (queue.inflight_tokens, queue.queued_tokens) == (inflight * 16, (5 - inflight) * 16)
        assert queue.pending_bytes == 5 * store.layout.full_block_bytes
        gate.set()
        assert [f.result(30) for f in futures] == [OK] * 5
        queue = store.read_queue()
        assert queue.pending_tokens == 0 and queue.read_tokens == 5 * 16


def queue_then_die(root: Path, ready) -> None:
    node = NodeState(root / "nodes", "n0", None)
    node.queued(1000, 10**6)
    node.started(100, 10**5)
    node.finished(100, 10**5, delivered=True)
    ready.set()
    os._exit(0)


def test_a_dead_process_leaves_no_phantom_queue(root):
    ready = SPAWN.Event()
    child = SPAWN.Process(target=queue_then_die, args=(root, ready))
    child.start()
    child.join(60)
    assert ready.is_set()
    node = NodeState(root / "nodes", "n0", None)
    try:
        queue = node.snapshot()
        assert queue.pending_tokens == 0
        assert queue.read_tokens == 100  # what it did read still counts for the node
    finally:
        node.close()


def test_3fs_backend_needs_the_library_and_a_mount(root, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "hf3fs_fuse", None)
    with pytest.raises(RuntimeError, match="hf3fs-py-usrbio"):
        open_store(root, hf3fs_mount=root)
    hf3fs_fake.install(monkeypatch, root / "mnt")
    with pytest.raises(RuntimeError, match="does not exist"):
        open_store(root, hf3fs_mount=root / "mnt")
    (root / "mnt").mkdir()
    with pytest.raises(RuntimeError, match="not on a 3FS mount"):
        open_store(root, hf3fs_mount=root / "mnt")


def test_3fs_backend_moves_data_through_usrbio_rings(root, monkeypatch):
    mount = root / "3fs"
    mount.mkdir()
    fake = hf3fs_fake.install(monkeypatch, mount)
    with open_store(mount / "kv", model="deepseek-v3", block_tokens=16, hf3fs_mount=mount) as store:
        keys = keys_for(3)
        blocks = fill(BlockBuffer(store.layout, 3), 3, seed=11)
        assert store.write(keys, blocks) == [OK] * 3
        corrupt_data(store, keys[2])
        out = poisoned(store, 3)
        assert store.read(keys, out.blocks(range(3))) == [OK, OK, CORRUPT]
        for got, want in zip(out.blocks(range(2)), blocks[:2], strict=True):
            np.testing.assert_array_equal(got, want)
        assert fake.ios == 6  # one USRBIO I/O per block each way (the iovec holds one block)
        assert fake.registered  # segment files stay open (and registered) while the store is
    assert not fake.registered


def count_reads(monkeypatch) -> list[int]:
    """Blocks moved by each PosixIO read."""
    blocks, real_readv = [], PosixIO.readv

    def counted(self, fd, buffers, offset):
        blocks.append(len(buffers))  # whole pages: a header and the data per block
        return real_readv(self, fd, buffers, offset)

    monkeypatch.setattr(PosixIO, "readv", counted)
    return blocks


def test_adjacent_blocks_are_read_with_merged_io(root, monkeypatch):
    with open_store(root, segment_bytes=1 << 20) as store:
        size = store.format.file_bytes
        keys = keys_for(8)
        blocks = fill(BlockBuffer(store.layout, 8), 8, seed=12)
        assert store.write(keys[:6], blocks[:6]) == [OK] * 6  # one batch: contiguous in one segment
        assert store.write(keys[6:], blocks[6:]) == [OK] * 2  # appended right behind it
        reads = count_reads(monkeypatch)
        out = poisoned(store, 8)
        assert store.read(keys, out.blocks(range(8))) == [OK] * 8
        assert sorted(reads) == [2 * 8]
        reads.clear()
        order = [5, 0, 1, 3, 4]  # batch order does not matter; the gap at block 2 splits the runs
        assert store.read([keys[i] for i in order], out.blocks(range(5))) == [OK] * 5
        assert sorted(reads) == [2 * 2, 2 * 3]
        for slot, i in enumerate(order):
            np.testing.assert_array_equal(out.block(slot), blocks[i])
        assert store.read_queue().read_tokens == 13 * 16  # the NIC and the queue still count blocks
    with open_store(root, segment_bytes=2 * size) as store:  # rolls over every two blocks
        more = keys_for(4, salt=2)
        for pair in (more[:2], more[2:]):
            assert store.write(pair, fill(BlockBuffer(store.layout, 2), 2, seed=13)) == [OK] * 2
        reads = count_reads(monkeypatch)
        assert store.read(more, poisoned(store, 4).blocks(range(4))) == [OK] * 4
        assert sorted(reads) == [2 * 2, 2 * 2]  # one run per segment


def test_a_block_freed_under_a_reader_is_a_miss_never_data(root, monkeypatch):
    with open_store(root) as store:
        keys = keys_for(3)
        blocks = fill(BlockBuffer(store.layout, 3), 3, seed=14)
        store.write(keys, blocks)
        gate, entered, _ = gate_reads(monkeypatch)
        futures = store.submit_read(keys, poisoned(store, 3).blocks(range(3)))
        assert entered.acquire(timeout=30)  # entries resolved, the I/O not issued yet
        assert store.delete(keys[1:]) == 2  # entry gone, space punched
        replacement = fill(BlockBuffer(store.layout, 1), 1, seed=15)
        assert store.write(keys[2:], replacement) == [OK]  # the key is back, elsewhere, other data
        gate.set()
        assert [f.result(30) for f in futures] == [OK, MISS, MISS]
        assert (store.stats().misses, store.stats().corrupt) == (2, 0)
        out = poisoned(store, 1)
        assert store.read(keys[2:], out.blocks([0])) == [OK]  # the stale reader left the new entry alone
        np.testing.assert_array_equal(out.block(0), replacement[0])
        assert store.usage() == 2 * store.format.file_bytes


def test_segments_are_unlinked_once_no_block_lives_in_them(root):
    with open_store(root) as store:
        size = store.format.file_bytes
    with open_store(root, segment_bytes=2 * size, capacity_bytes=4 * size, evict_to_fraction=0.5) as store:
        keys = keys_for(6)
        blocks = fill(BlockBuffer(store.layout, 6), 6, seed=16)
        for first in range(0, 6, 2):
            assert store.write(keys[first : first + 2], blocks[first : first + 2]) == [OK] * 2
        # The third pair evicted the first (down to half of capacity): its segment, sealed and empty, is gone.
        assert [store.prefix_length([k]) for k in keys] == [0, 0, 1, 1, 1, 1]
        assert len(segment_files(store)) == 2
        assert store.delete(keys) == 4
        assert len(segment_files(store)) == 1  # the writer's current segment stays open for appends
        assert store.usage() == 0
    assert segment_files(store) == []  # sealed at close, and empty


def write_shared_keys(root: Path, keys: list[str], seed: int, start, results) -> None:
    store = open_store(root)
    blocks = fill(BlockBuffer(store.layout, len(keys)), len(keys), seed=seed)
    start.wait()
    results.put((seed, [status.value for status in store.write(keys, blocks)]))
    store.close()


def test_processes_writing_the_same_keys_publish_one_copy_each(root):
    keys = keys_for(6)
    start, results = SPAWN.Event(), SPAWN.Queue()
    writers = [SPAWN.Process(target=write_shared_keys, args=(root, keys, seed, start, results)) for seed in range(3)]
    for writer in writers:
        writer.start()
    start.set()
    outcomes = [statuses for _, statuses in sorted(results.get(timeout=120) for _ in writers)]  # by seed
    for writer in writers:
        writer.join(60)
    assert all(sorted(column) == ["exists", "exists", "ok"] for column in zip(*outcomes, strict=True))
    with open_store(root) as store:
        out = poisoned(store, 6)
        assert store.read(keys, out.blocks(range(6))) == [OK] * 6
        for block, winner in enumerate(column.index("ok") for column in zip(*outcomes, strict=True)):
            expected = fill(BlockBuffer(store.layout, 6), 6, seed=winner)[block]
            np.testing.assert_array_equal(out.block(block), expected)
        assert store.usage() == 6 * store.format.file_bytes
        assert store.delete(keys) == 6
        assert segment_files(store) == []  # the losers' copies were punched: nothing is left


def test_blocks_survive_a_restart(root):
    keys = keys_for(4)
    with open_store(root) as store:
        blocks = fill(BlockBuffer(store.layout, 4), 4, seed=17)
        assert store.write(keys[:2], blocks[:2]) == [OK] * 2
    with open_store(root) as store:
        assert store.prefix_length(keys) == 2
        assert store.usage() == 2 * store.format.file_bytes
        assert store.write(keys, blocks) == [EXISTS, EXISTS, OK, OK]
        assert len(segment_files(store)) == 2  # a new writer appends to a new segment
    with open_store(root) as store:
        out = poisoned(store, 4)
        assert store.read(keys, out.blocks(range(4))) == [OK] * 4
        for got, want in zip(out.blocks(range(4)), blocks, strict=True):
            np.testing.assert_array_equal(got, want)


def test_store_bench_writes_side_by_side_records_and_removes_its_scratch(root, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARK_DIR))  # its NIC readers are spawned processes that import it by name
    main = importlib.import_module("store_bench").main

    scratch, results = root / "scratch", root / "results"
    common = ["--model", "tiny", "--block-tokens", "16", "--blocks", "8", "--dir", str(scratch),
              "--results", str(results)]
    assert main([*common, "--batch-blocks", "0"]) == 2
    assert "--batch-blocks >= 1" in capsys.readouterr().err
    assert not results.exists()

    assert main([*common, "--batch-blocks", "3", "--rounds", "2", "--nic-seconds", "2"]) == 0
    records = json.loads((results / "store_bench.json").read_text())
    assert [r["metric"] for r in records] == ["store_batched_read_throughput",
                                              "store_batched_read_throughput_vs_hot_buffer",
                                              "emulated_nic_worst_1s_window"]
    for record in records:
        assert record["value"] > 0 and record["baseline_value"] > 0
        assert record["ratio"] == pytest.approx(record["value"] / record["baseline_value"])
        assert record["command"].startswith("python benchmark/store_bench.py --model tiny")
    assert not scratch.exists()
