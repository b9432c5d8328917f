"""DualPath inside real SGLang servers: plugin pieces (unit) and a real prefill/decode pair on CPU."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dualpath.kv import BlockBuffer, BlockLayout, block_keys, get_geometry
from dualpath.scheduler import ReadSide, RouteHint
from dualpath.scheduler.report import KVChannelAddress, NodeReport
from dualpath.srt import surface
from dualpath.srt.blocks import BlockSlots, SlotsExhausted
from dualpath.srt.config import ENV, SrtConfig
from dualpath.srt.early import EarlyReads
from dualpath.store import BlockStore, NodeReader, StoreConfig, StoreIndex, node_dir
from hypothesis import given
from hypothesis import strategies as st

channel = st.builds(KVChannelAddress, st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True),
                    st.sampled_from(["127.0.0.1", "10.1.2.3", "fe80::1", "pe-3.cluster.local"]), st.integers(1, 65535))
PE, DE, DE1 = (KVChannelAddress.parse(f"{name}@127.0.0.1:{port}") for name, port in (("pe", 1), ("de", 2), ("de1", 3)))


# -- route hints and configuration ---------------------------------------------------------------------------
@given(channel, channel, channel, st.integers(1, 1 << 30), st.integers(0, 1 << 30), st.text(max_size=40))
def test_route_hint_round_trips(pe: KVChannelAddress, de: KVChannelAddress, helper: KVChannelAddress, de_tokens: int,
                                helper_tokens: int, client_key: str) -> None:
    for hint in (RouteHint(ReadSide.PE), RouteHint(ReadSide.DE, pe, de), RouteHint(ReadSide.SPLIT, pe, de, de_tokens),
                 RouteHint(ReadSide.SPLIT, pe, de, de_tokens - 1, helper, helper_tokens + 1),
                 RouteHint(ReadSide.DE, pe, de, client_key=client_key)):  # any key: ';', '=', a DualPath key
        assert RouteHint.decode(hint.encode()) == hint
        assert sum(tokens for _, tokens in hint.plan.tokens(de_tokens + helper_tokens)) == de_tokens + helper_tokens
    assert KVChannelAddress.parse(str(de)) == de
    plan = RouteHint(ReadSide.SPLIT, pe, de, 64, helper, 128).plan
    assert plan.tokens(1000) == [(de, 64), (helper, 128), (None, 808)]
    assert plan.tokens(100) == [(de, 64), (helper, 36), (None, 0)]


def test_a_read_plan_gives_every_page_its_reader_once() -> None:
    ids = list(range(1, 5 * 64 + 30))  # 5 whole pages and a part
    keys = block_keys(ids, 64)
    for hint, readers in ((RouteHint(ReadSide.PE), [None] * 5), (RouteHint(ReadSide.DE, PE, DE), [DE] * 5),
                          (RouteHint(ReadSide.SPLIT, PE, DE, 128, DE1, 100), [DE, DE, DE1, None, None]),
                          (RouteHint(ReadSide.SPLIT, PE, DE, 1000), [DE] * 5)):
        pages = hint.plan.page_readers(ids, 64)
        assert [hint.plan.reader(key, pages) for key in keys[:5]] == readers, hint
        assert set(pages) <= set(keys[:5])  # only the leading runs' pages are listed, each at most once


def test_kv_channel_addresses_are_routable_and_parsed_in_one_place() -> None:
    assert KVChannelAddress.parse("de-1@[fe80::1]:7000") == KVChannelAddress("de-1", "fe80::1", 7000)
    assert KVChannelAddress("de-1", "fe80::1", 7000).endpoint == "tcp://[fe80::1]:7000"
    for bad in ("de@0.0.0.0:1", "de@[::]:1", "de@127.0.0.1", "127.0.0.1:7000", "d;e@127.0.0.1:1", "de@h:70000"):
        with pytest.raises(ValueError):
            KVChannelAddress.parse(bad)


def test_route_hint_rejects_bad_input() -> None:
    assert RouteHint.decode(None) is None and RouteHint.decode("user-key") is None
    with pytest.raises(ValueError, match="KV channels"):
        RouteHint(ReadSide.DE, PE)
    with pytest.raises(ValueError, match="KV channels"):
        RouteHint(ReadSide.SPLIT, de_tokens=64)
    with pytest.raises(ValueError, match="de_tokens"):
        RouteHint(ReadSide.SPLIT, PE, DE)
    with pytest.raises(ValueError, match="de_tokens"):
        RouteHint(ReadSide.DE, PE, DE, 64)
    with pytest.raises(ValueError, match="helper needs"):
        RouteHint(ReadSide.SPLIT, PE, DE, 64, None, 64)
    with pytest.raises(ValueError, match=">= 0"):
        RouteHint(ReadSide.SPLIT, PE, DE, 128, DE1, -64)
    with pytest.raises(ValueError, match="malformed"):
        RouteHint.decode("dualpath/1;side=split;pe=pe@127.0.0.1:1;de=de@127.0.0.1:2;de_tokens=64;help=de1x;help_tokens=64")
    with pytest.raises(ValueError, match="PE side, the DE side or both"):
        RouteHint(ReadSide.NONE)
    with pytest.raises(ValueError, match="malformed"):
        RouteHint.decode("dualpath/1;side=sideways")


def test_srt_config_travels_through_the_environment() -> None:
    config = SrtConfig("decode", "de0", "/tmp/store", "10.0.0.7", 31001, nic_gbps=2.5)
    assert SrtConfig.from_env({ENV: config.to_env()}) == config
    assert SrtConfig.from_env({}) is None
    assert str(config.kv_channel) == "decode-de0-31001@10.0.0.7:31001"
    with pytest.raises(ValueError, match="role"):
        SrtConfig("encode", "n", "/tmp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a valid DualPath configuration"):
        SrtConfig.from_env({ENV: '{"node": "pe0"}'})


# -- hook targets ---------------------------------------------------------------------------------------------
def test_self_check_names_a_missing_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(surface.TARGETS, "add_request", "dualpath.srt.surface.no_such_function")
    with pytest.raises(surface.HookTargetError, match=r"'add_request' = 'dualpath\.srt\.surface\.no_such_function'"):
        surface.self_check()
    with pytest.raises(surface.HookTargetError, match="unknown"):
        surface.resolve("nothing")


class _Shaped:
    limit = 1

    def __init__(self) -> None:
        self.built = True
        self.low, self.high = 0, 1

    def use(self) -> int:
        return self.only_read  # type: ignore[attr-defined]


def test_self_check_resolves_the_attributes_dualpath_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert surface.missing_attributes(_Shaped, ["limit", "built", "low", "high", "use", "only_read", "nowhere"]) == [
        "only_read", "nowhere"]
    surface.self_check(["scheduler", "req", "host_pool", "server_args"])  # e.g. max_prefill_tokens: tuple-unpacked
    monkeypatch.setitem(surface.ATTRIBUTES, "req", (*surface.ATTRIBUTES["req"], "routing_hint"))
    with pytest.raises(surface.HookTargetError, match=r"\['routing_hint'\] of sglang\.srt\.managers\.schedule_batch"):
        surface.self_check(["req"])


def test_request_routes_live_in_the_storage_backend_sglang_owns() -> None:
    from types import SimpleNamespace

    from dualpath.srt import requests

    def scheduler_with(backend: object) -> SimpleNamespace:
        return SimpleNamespace(tree_cache=SimpleNamespace(cache_controller=SimpleNamespace(storage_backend=backend)))

    prefetched: list[tuple[str, list[int], str | None]] = []
    ours = SimpleNamespace(routes=requests.RequestRoutes(64), prefetching=lambda *call: prefetched.append(call))
    other = SimpleNamespace(routes=requests.RequestRoutes(64))
    hint = RouteHint(ReadSide.DE, PE, DE).encode()
    req = SimpleNamespace(rid="r1", bootstrap_room=7, routing_key=hint, origin_input_ids=[1, 2, 3])
    seen = requests.on_add_request(lambda scheduler, r: ours.routes.current(), scheduler_with(ours), req)
    assert seen.rid == "r1" and seen.room == 7 and seen.side is ReadSide.DE and seen.reader("k") == DE
    assert ours.routes.get("r1") == seen and other.routes.get("r1") is None
    assert ours.routes.current().hint is None  # outside the call: no current request
    assert other.routes.current().rid == ""  # two backends in one process share nothing
    operation = SimpleNamespace(request_id="r1")
    controller = SimpleNamespace(storage_backend=ours)
    assert requests.on_operation(lambda c, op: ours.routes.current(), controller, operation).side is ReadSide.DE
    # The early read starts where HiCache starts a prefetch, for its pages; where HiCache recomputes, none does.
    cache = SimpleNamespace(cache_controller=controller, ongoing_prefetch={})

    def hicache_prefetch(cache: SimpleNamespace, rid: str, node: object, tokens: list[int],
                         last_key: str | None = None) -> str:
        if len(tokens) >= 256:  # HiCache's prefetch_threshold
            cache.ongoing_prefetch[rid] = node
        return "done"

    assert requests.on_prefetch(hicache_prefetch, cache, "r1", None, list(range(128))) == "done"
    assert not prefetched
    assert requests.on_prefetch(hicache_prefetch, cache, "r1", None, list(range(320)), "ab" * 32) == "done"
    assert prefetched == [("r1", list(range(320)), "ab" * 32)]
    # A server whose storage backend is not DualPath's is left alone.
    stock = scheduler_with(SimpleNamespace())
    assert requests.on_add_request(lambda scheduler, r: "stock", stock, req) == "stock"
    assert requests.on_prefetch(hicache_prefetch, SimpleNamespace(cache_controller=SimpleNamespace(
        storage_backend=SimpleNamespace()), ongoing_prefetch={}), "r2", None, list(range(320))) == "done"
    assert len(prefetched) == 1


def test_on_cpu_hicache_keeps_less_dram_free_beside_its_host_pool() -> None:
    pytest.importorskip("sglang", reason="SGLang's host pool module")
    from dualpath.srt import cpu
    from sglang.srt.mem_cache.pool_host import base

    stock = base.HICACHE_HOST_MEMORY_RESERVE_BYTES
    try:
        cpu.reserve_less_host_memory()
        assert base.HICACHE_HOST_MEMORY_RESERVE_BYTES == cpu.CPU_HOST_RESERVE_BYTES < stock
    finally:
        base.HICACHE_HOST_MEMORY_RESERVE_BYTES = stock


def test_an_idle_cpu_scheduler_turn_gives_the_core_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualpath.srt import cpu

    slept: list[float] = []
    monkeypatch.setattr(cpu.time, "sleep", slept.append)
    assert cpu._yield_when_idle(lambda scheduler, x: x + 1, object(), 1) == 2

    def failing(scheduler: object) -> None:
        raise RuntimeError("idle check failed")

    with pytest.raises(RuntimeError, match="idle check failed"):
        cpu._yield_when_idle(failing, object())
    assert slept == [cpu.IDLE_YIELD_S, cpu.IDLE_YIELD_S]
    assert ("scheduler_idle", "", cpu._yield_when_idle) in cpu.hooks()
    surface.self_check(["scheduler_idle"])


def test_cpu_nixl_agents_run_without_the_spinning_progress_thread() -> None:
    from dualpath.srt import cpu
    from nixl._api import nixl_agent_config

    created: list[tuple[str, object]] = []

    def init(agent: object, name: str, conf: object) -> None:
        created.append((name, conf))

    given = nixl_agent_config(backends=[], num_threads=8)
    cpu._no_progress_thread(init, object(), "sglang", given)
    cpu._no_progress_thread(init, object(), "default")
    assert [name for name, _ in created] == ["sglang", "default"]
    assert created[0][1] is given and given.num_threads == 8  # SGLang's other settings stay
    assert not any(conf.enable_pthread for _, conf in created)
    assert ("nixl_agent", "__init__", cpu._no_progress_thread) in cpu.hooks()


def test_launcher_adds_what_dualpath_needs_and_refuses_contradictions(tmp_path: Path) -> None:
    from dualpath.srt.launch import dualpath_parser, sglang_argv

    def launch_line(*argv: str) -> tuple[list[str], dict]:
        args, rest = dualpath_parser().parse_known_args(list(argv))
        line = sglang_argv(rest, args)
        return line, json.loads(line[-1])  # the merged extra-config comes last, so it wins

    line, extra = launch_line("--model-path", "m", "--disaggregation-mode", "decode", "--page-size", "16",
                              "--dualpath-node", "de3", "--hicache-storage-backend-extra-config",
                              '{"prefetch_threshold": 128}')
    assert line[line.index("--hicache-storage-backend") + 1] == "dynamic"
    assert "--disaggregation-decode-enable-radix-cache" in line and line.count("--page-size") == 1
    assert "--disable-overlap-schedule" in line  # this machine has no CUDA
    assert extra["prefetch_threshold"] == 128 and extra["node"] == "de3" and extra["backend_name"] == "dualpath"
    # SGLang's own parse decides: an abbreviation or a --config file is seen as the flag itself.
    with pytest.raises(ValueError, match="--hicache-mem-layout layer_first"):
        launch_line("--model-path", "m", "--hicache-mem-lay", "page_first")
    config = tmp_path / "server.yaml"
    config.write_text("hicache-storage-prefetch-policy: best_effort\n")
    with pytest.raises(ValueError, match="--hicache-storage-prefetch-policy wait_complete"):
        launch_line("--model-path", "m", "--config", str(config))
    line, _ = launch_line("--model-path", "m", "--hicache-mem-layout", "layer_first")
    assert line.count("--hicache-mem-layout") == 1
    with pytest.raises(ValueError, match="does not support --enable-dp-attention"):
        launch_line("--model-path", "m", "--tp", "2", "--dp", "2", "--enable-dp-attention")


def test_the_extra_config_is_checked_and_the_kv_host_is_routable(monkeypatch: pytest.MonkeyPatch) -> None:
    from dualpath.srt.config import BACKEND

    def config(bind: str = "127.0.0.1", **keys: object) -> SrtConfig | None:
        return SrtConfig.from_extra_config({**BACKEND, **keys}, "prefill", "m", 64, bind)

    monkeypatch.setenv("SGLANG_HOST_IP", "127.0.0.5")
    made = config(node="pe1", nic_gbps=1.5, prefetch_threshold=64)
    assert (made.node, made.kv_host, made.nic_gbps) == ("pe1", "127.0.0.5", 1.5) and made.kv_port > 0
    assert config(node="pe1", kv_host="10.9.8.7", kv_port=4567).kv_channel == KVChannelAddress(
        "prefill-pe1-4567", "10.9.8.7", 4567)
    assert SrtConfig.from_extra_config({"backend_name": "file"}, "prefill", "m", 64, "0.0.0.0") is None
    with pytest.raises(ValueError, match="unknown DualPath extra-config keys \\['nodes'\\]"):
        config(nodes="pe1")
    with pytest.raises(ValueError, match="module_path"):
        SrtConfig.from_extra_config({**BACKEND, "module_path": "elsewhere"}, "prefill", "m", 64, "127.0.0.1")
    with pytest.raises(ValueError, match="routable host"):
        config(kv_host="0.0.0.0")
    with pytest.raises(ValueError, match="nic_gbps"):
        config(nic_gbps="fast")
    # Without a host given, SGLang's detection; a loopback answer is refused for a server other hosts reach.
    monkeypatch.delenv("SGLANG_HOST_IP")
    monkeypatch.setitem(surface.TARGETS, "local_ip", "dualpath.srt.test_loopback_ip")
    monkeypatch.setattr("dualpath.srt.test_loopback_ip", lambda: "127.0.0.1", raising=False)
    with pytest.raises(ValueError, match="other hosts cannot reach"):
        config(bind="0.0.0.0")
    assert config(bind="127.0.0.1").kv_host == "127.0.0.1"


def test_prefill_budget_follows_the_compute_quota() -> None:
    from dualpath.scheduler import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
    from dualpath.srt.batching import prefill_budget

    per_token = AttentionCostModel(base_s=0.0, per_token_s=1e-3, per_pair_s=0.0)  # 1 ms per new token
    batcher = ComputeQuotaBatcher(per_token.predict, BatcherConfig(quota_s=0.1))
    # 30 whole tokens, then the next request chunked to the 70 that still fit; rounded up to 16-token pages
    assert prefill_budget(batcher, [Chunk(1, 0, 30), Chunk(2, 500, 200)], 16) == 112
    assert prefill_budget(batcher, [Chunk(1, 0, 0)], 16) is None


def test_the_cost_model_is_fitted_to_the_servers_own_prefill_batches() -> None:
    from types import SimpleNamespace

    from dualpath.scheduler import AttentionCostModel, BatcherConfig, Chunk, ComputeQuotaBatcher
    from dualpath.srt.batching import (
        MIN_BATCHES,
        RESAMPLE_EVERY,
        WARMUP_BATCHES,
        BatchTimer,
        CostProfile,
        QuotaHook,
        prefill_budget,
    )

    truth = AttentionCostModel(0.002, 1e-4, 2e-8)
    profile, clock = CostProfile(), [0.0]
    timer, quota = BatchTimer(profile, clock=lambda: clock[0]), QuotaHook(0.1, profile)
    budgets: list[object] = []
    waiting = SimpleNamespace(prefix_indices=[], host_hit_length=0, storage_hit_length=0,
                              origin_input_ids=list(range(3000)))
    scheduler = SimpleNamespace(chunked_req=None, waiting_queue=[waiting], page_size=16, max_prefill_tokens=16384,
                                chunked_prefill_size=2048, tree_cache=None)
    quota(lambda s: budgets.append(s.max_prefill_tokens), scheduler)
    assert budgets == [16384]  # no model yet: SGLang's own budgets

    def run(scheduler: object, batch: SimpleNamespace) -> None:  # the "forward" takes what the true model says
        clock[0] += truth.predict(list(zip(batch.prefix_lens, batch.extend_lens, strict=True)))

    extend = SimpleNamespace(is_extend=lambda: True)
    rng = random.Random(0)
    timed = 0
    for i in range(WARMUP_BATCHES + MIN_BATCHES + 2 * RESAMPLE_EVERY):
        pairs = [(rng.randrange(0, 4000), rng.randrange(1, 2000)) for _ in range(rng.randrange(1, 4))]
        batch = SimpleNamespace(forward_mode=extend, prefix_lens=[c for c, _ in pairs],
                                extend_lens=[n for _, n in pairs])
        before = len(profile._batches)
        timer(run, scheduler, batch)
        timed += len(profile._batches) - before
        if i + 1 == WARMUP_BATCHES + MIN_BATCHES - 1:
            assert profile.model is None
    assert timed == MIN_BATCHES + 2  # after the warm-up the first batches, then one in RESAMPLE_EVERY
    decode = SimpleNamespace(forward_mode=SimpleNamespace(is_extend=lambda: False), prefix_lens=[], extend_lens=[])
    timer(lambda s, b: None, scheduler, decode)  # decode batches are never timed
    assert len(profile._batches) == timed
    queue = [Chunk(1, 3000, 1500)]
    fitted_budget = prefill_budget(ComputeQuotaBatcher(profile, BatcherConfig(0.1)), queue, 16)
    true_budget = prefill_budget(ComputeQuotaBatcher(truth, BatcherConfig(0.1)), queue, 16)
    assert fitted_budget is not None and abs(fitted_budget - true_budget) <= 32  # the quota chunks as the truth does
    assert CostProfile(truth).model is truth and not CostProfile(truth).wants_timing()  # a given model stays

    # Batches of one size only (fresh 2048-token prompts): no fit, SGLang's budgets.
    same_size = CostProfile()
    for _ in range(WARMUP_BATCHES + MIN_BATCHES + 4):
        batch = SimpleNamespace(forward_mode=extend, prefix_lens=[0], extend_lens=[2048])
        BatchTimer(same_size, clock=lambda: clock[0])(run, scheduler, batch)
    assert same_size.model is None
    # The fitted quota chunks the waiting 3000-token prompt; a fixed cost over the quota would only shrink chunks
    # to a page without meeting it, so SGLang's budgets stay.
    budgets.clear()
    quota(lambda s: budgets.append(s.max_prefill_tokens), scheduler)
    over = QuotaHook(0.1, CostProfile(AttentionCostModel(0.2, 1e-4, 0.0)))
    over(lambda s: budgets.append(s.max_prefill_tokens), scheduler)
    expected = prefill_budget(ComputeQuotaBatcher(truth, BatcherConfig(0.1)), [Chunk(0, 0, 3000)], 16)
    assert abs(budgets[0] - expected) <= 32 and expected < 3000 and budgets[1] == 16384


# -- block slots ---------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    with BlockStore(StoreConfig(tmp_path, model="tiny", block_tokens=16, node="n0")) as s:
        yield s


def _write_blocks(store: BlockStore, count: int, seed: int) -> list[str]:
    keys = block_keys(list(range(seed, seed + 16 * count)), 16)
    buffer = BlockBuffer(store.layout, count)
    for i, block in enumerate(buffer.blocks(range(count))):
        block[...] = i + 1
    store.write(keys, buffer.blocks(range(count)))
    return keys


def _read_tokens(store: BlockStore) -> int:
    return store.read_queue().read_tokens


def test_block_slots_read_once_and_serve_from_cache(store: BlockStore) -> None:
    keys = _write_blocks(store, 4, 0)
    slots = BlockSlots(BlockLayout(get_geometry("tiny"), 16), 6, timeout_s=1.0)
    first = slots.read(store, keys)
    assert [int(slots.block(s).flat[0]) for s in first] == [1, 2, 3, 4]
    slots.release(first)
    tokens = _read_tokens(store)
    again = slots.read(store, keys[:2])
    assert _read_tokens(store) == tokens  # served from the cache: no storage read
    slots.forget()  # a cache flush: blocks in use stay readable, none is served from the cache again
    assert [int(slots.block(s).flat[0]) for s in again] == [1, 2]
    slots.release(again)
    third = slots.read(store, keys)
    assert _read_tokens(store) == tokens + 4 * 16
    assert [int(slots.block(s).flat[0]) for s in third] == [1, 2, 3, 4]
    slots.release(third)
    assert len(slots.take(6)) == 6  # every slot came back


def test_block_slots_stop_at_the_first_missing_block(store: BlockStore) -> None:
    keys = _write_blocks(store, 3, 100)
    store.delete([keys[1]])
    slots = BlockSlots(BlockLayout(get_geometry("tiny"), 16), 4, timeout_s=1.0)
    got = slots.read(store, keys)
    assert len(got) == 1
    slots.release(got)
    assert len(slots.take(4)) == 4  # every slot came back


def test_block_slots_report_exhaustion_and_keep_state(store: BlockStore) -> None:
    slots = BlockSlots(BlockLayout(get_geometry("tiny"), 16), 2, timeout_s=0.05)
    held = slots.take(2)
    with pytest.raises(SlotsExhausted):
        slots.take(1)
    with pytest.raises(ValueError, match="do not fit"):
        slots.take(3)
    slots.release(held)
    assert sorted(slots.take(2)) == sorted(held)


def test_early_reads_wait_for_every_reader_and_one_stalled_nic_holds_back_no_other() -> None:
    early = EarlyReads(capacity=8, threads_per_reader=1)
    release_de, de_started = threading.Event(), threading.Event()
    done: list[tuple[str, KVChannelAddress | None]] = []
    gave_up: list[str] = []

    def read(reader: KVChannelAddress | None, rid: str) -> None:
        if reader == DE:
            de_started.set()
            if not release_de.wait(10):
                gave_up.append(rid)
        done.append((rid, reader))

    try:
        early.start("r1", [DE, None], lambda reader: read(reader, "r1"))
        early.start("r2", [None], lambda reader: read(reader, "r2"))
        early.wait("r2")  # the DE's NIC is stalled on r1; r2 reads on this node's own threads meanwhile
        assert de_started.is_set() and not gave_up and set(done) == {("r1", None), ("r2", None)}
        waiter = threading.Thread(target=early.wait, args=("r1",))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # HiCache's thread waits for the DE's part of r1 ...
        release_de.set()
        waiter.join(10)
        assert not waiter.is_alive() and ("r1", DE) in done  # ... and goes on once it landed
        early.wait("unknown")  # a request without early reads: at once
    finally:
        release_de.set()
        early.close()
    with pytest.raises(RuntimeError, match="closed"):
        early.start("r3", [""], lambda reader: None)


def test_early_reads_forget_the_oldest_requests_beyond_capacity() -> None:
    early = EarlyReads(capacity=2, threads_per_reader=1)
    gate = threading.Event()
    try:
        early.start("old", [None], lambda reader: gate.wait(10))
        early.start("mid", [None], lambda reader: None)
        early.start("new", [None], lambda reader: None)
        early.wait("old")  # forgotten: nothing to wait for, though its read still runs
        assert not gate.is_set()
    finally:
        gate.set()
        early.close()


# -- a real SGLang prefill/decode pair with the plugin, and stock SGLang ------------------------------------------
sglang = pytest.importorskip("sglang", reason="the SGLang integration tests need `pip install sglang==0.5.17`")

from dualpath.cluster.replay import same_logprobs  # noqa: E402
from dualpath.cluster.servers import (  # noqa: E402
    Server,
    ServerOptions,
    ServerSpec,
    flush_cache,
    pd_generate,
    post_generate,
    start_servers,
    stop_servers,
    with_random_weights,
)
from dualpath.transfer import KVChannel, TransferConfig  # noqa: E402

BOOTSTRAP = 18998
COMPUTE_GBPS, COMPUTE_NIC = 0.01, f"test-srt-{os.getpid()}"
QUOTA_TOKENS = 128
SAMPLING = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
# Paths are compared by the top-k logprobs of every output token, not by greedy ids alone.
LOGPROBS = {"return_logprob": True, "top_logprobs_num": 5}
TopLogprobs = list[list[tuple[float, int]]]


def top_logprobs(response: dict) -> TopLogprobs:
    """The top-k (logprob, token) of every output token."""
    return [[(logprob, token) for logprob, token, _ in top] for top in response["meta_info"]["output_top_logprobs"]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    from dualpath.cluster.servers import TINY_MODEL

    root = tmp_path_factory.mktemp("srt")
    options = ServerOptions(root / "store", root / "logs", with_random_weights(TINY_MODEL, root / "tiny_llama"),
                            transfer_timeout_s=3.0, extra_args=("--load-format", "safetensors"),
                            env={"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60"})
    # The prefill runs the PE compute quota: 1 ms per new token under a 100 ms quota, 128 tokens a batch.
    quota = ("--dualpath-prefill-quota-ms", "100", "--dualpath-cost-model", "0,0.001,0")
    # Both share one emulated compute NIC of 10 Mb/s: a DE's pages take about 0.1 s a page to land, so the prefill
    # admits a DE-side request while most of its layers are still on the way.
    link = ("--dualpath-compute-gbps", str(COMPUTE_GBPS), "--dualpath-compute-nic", COMPUTE_NIC)
    specs = [ServerSpec("prefill", 31100, "pe0", bootstrap_port=BOOTSTRAP, extra_args=quota + link),
             ServerSpec("decode", 31200, "de0", extra_args=link), ServerSpec("null", 31300, dualpath=False)]
    started = start_servers(specs, options, timeout_s=400)
    yield {s.spec.role: s for s in started} | {"store": root / "store"}
    stop_servers(started)
    assert all(not s.alive() for s in started)


def _pd_generate(servers: dict, ids: list[int], hint: RouteHint) -> tuple[TopLogprobs, dict]:
    """The decode's top logprobs of every output token, and the prefill's meta info."""
    body = {"input_ids": ids, "sampling_params": SAMPLING, **LOGPROBS}
    prefill, decode = pd_generate(servers["prefill"], servers["decode"], body, hint.encode(), timeout_s=120)
    return top_logprobs(decode), prefill["meta_info"]


def _stock(servers: dict, ids: list[int]) -> TopLogprobs:
    return top_logprobs(post_generate(servers["null"].url, {"input_ids": ids, "sampling_params": SAMPLING, **LOGPROBS},
                                      timeout_s=120))


def _node_read_tokens(store_root: Path, node: str) -> int:
    """Tokens the node's NIC has read, from its state on this host (the helper DE below has no server to ask)."""
    reader = NodeReader(node_dir(store_root), node)
    try:
        return reader.snapshot().read_tokens
    finally:
        reader.close()


def _flush(servers: dict) -> None:
    for role in ("prefill", "decode"):
        flush_cache(servers[role].url, 30)


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(3, 32000) for _ in range(300)]


def _stored(servers: dict, ids: list[int]) -> list[str]:
    """The prompt's full pages, once the decode has written them back (it does so asynchronously)."""
    keys = block_keys(ids, 64)[: len(ids) // 64]
    index, namespace = StoreIndex(servers["store"]), servers["decode"].report().store_namespace
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if index.stored_prefix(keys, namespace) == len(keys):
            return keys
        time.sleep(0.2)
    raise AssertionError("the decode did not write the prompt's blocks back")


def _report_reaches(server: Server, counter: str, value: int | Callable[[int], bool], timeout_s: float = 5.0) -> bool:
    """Whether the server's report shows ``counter`` at ``value`` (or passing it) within ``timeout_s`` (reports
    follow the counters within 0.2 s)."""
    passes = value if callable(value) else value.__eq__
    deadline = time.monotonic() + timeout_s
    while not passes(getattr(server.report(), counter)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return passes(getattr(server.report(), counter))


def _entered_layer_by_layer(prefill: Server, before: NodeReport, pages: int) -> bool:
    """Whether ``pages`` DE pages entered the prefill's forward layer by layer since ``before``: admitted before their
    last layer landed, and (any at all) with layer 0 placed from the slots into the device pool while later layers
    were still landing."""
    layerwise = _report_reaches(prefill, "pages_layerwise", before.pages_layerwise + pages)
    from_slots = _report_reaches(prefill, "layers_from_slots", lambda n: n > before.layers_from_slots,
                                 5.0 if pages else 0.5)
    return layerwise and from_slots == bool(pages)


def _channels(servers: dict) -> tuple[KVChannelAddress, KVChannelAddress]:
    return servers["prefill"].report().kv_channel, servers["decode"].report().kv_channel


def test_pe_path_matches_stock_and_the_decode_writes_back(servers: dict) -> None:
    ids = _prompt(1)
    out, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    stock = _stock(servers, ids)
    assert same_logprobs(out, stock)
    assert len({token for top in stock for _, token in top}) > 5  # random weights: the oracle can tell outputs apart
    assert len(_stored(servers, ids)) == 4


@pytest.mark.parametrize("side", [ReadSide.DE, ReadSide.PE, ReadSide.SPLIT])
def test_hit_kv_is_read_through_the_chosen_nic(servers: dict, side: ReadSide) -> None:
    # A fresh prompt per case: servers keep blocks they received in their slot cache.
    ids = _prompt({ReadSide.DE: 2, ReadSide.PE: 4, ReadSide.SPLIT: 6}[side])
    expected, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    hit = 64 * len(_stored(servers, ids))
    _flush(servers)
    store = servers["store"]
    before = {n: _node_read_tokens(store, n) for n in ("pe0", "de0")}
    prefill_before = servers["prefill"].report()
    de_tokens = {ReadSide.DE: hit, ReadSide.PE: 0, ReadSide.SPLIT: 128}[side]  # split: the DE reads pages 0-1
    hint = RouteHint(side, *_channels(servers), de_tokens if side is ReadSide.SPLIT else 0) \
        if side is not ReadSide.PE else RouteHint(ReadSide.PE)
    out, prefill_meta = _pd_generate(servers, ids, hint)
    assert same_logprobs(out, expected) and same_logprobs(out, _stock(servers, ids))
    assert prefill_meta["cached_tokens_details"]["storage"] == hit
    read = {n: _node_read_tokens(store, n) - before[n] for n in ("pe0", "de0")}
    assert read == {"pe0": hit - de_tokens, "de0": de_tokens}
    assert _entered_layer_by_layer(servers["prefill"], prefill_before, de_tokens // 64)


def test_a_decode_forwards_the_pages_its_host_pool_holds_without_reading_them(servers: dict) -> None:
    ids = _prompt(12)
    expected, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    hit = 64 * len(_stored(servers, ids))  # written back from the decode's host pool, which keeps them
    flush_cache(servers["prefill"].url, 30)
    store, decode_before = servers["store"], servers["decode"].report()
    before = {n: _node_read_tokens(store, n) for n in ("pe0", "de0")}
    out, prefill_meta = _pd_generate(servers, ids, RouteHint(ReadSide.DE, *_channels(servers)))
    assert same_logprobs(out, expected)
    assert prefill_meta["cached_tokens_details"]["storage"] == hit  # a store hit to the prefill ...
    assert {n: _node_read_tokens(store, n) - before[n] for n in ("pe0", "de0")} == {"pe0": 0, "de0": 0}
    # ... that no NIC read: the decode forwarded every page from its memory.
    assert _report_reaches(servers["decode"], "pages_forwarded_from_memory",
                           decode_before.pages_forwarded_from_memory + hit // 64)


def test_pd_and_de_kv_share_the_emulated_compute_nic_by_priority(servers: dict) -> None:
    from dualpath.srt.traffic import compute_nic
    from dualpath.transfer import PriorityLimiter

    ids = _prompt(10)
    link = PriorityLimiter(compute_nic(SrtConfig("prefill", compute_nic=COMPUTE_NIC, compute_gbps=COMPUTE_GBPS)))
    try:
        before = link.stats()
        expected, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
        pe_side = link.stats()
        hit = 64 * len(_stored(servers, ids))
        _flush(servers)
        out, _ = _pd_generate(servers, ids, RouteHint(ReadSide.DE, *_channels(servers)))
        de_side = link.stats()
    finally:
        link.close()
    assert same_logprobs(out, expected)
    page_bytes = 64 * 2 * 2 * 2 * 64 * 4  # 64 tokens x 2 layers x K, V x 2 heads x 64 dims x fp32
    # SGLang's PD transfer (the whole prompt's KV, high priority) ...
    assert pe_side.model_bytes - before.model_bytes >= hit // 64 * page_bytes
    assert pe_side.kv_bytes == before.kv_bytes
    # ... and the DE's forwarding of the hit (low priority) went over the same link.
    assert de_side.kv_bytes - pe_side.kv_bytes == hit // 64 * page_bytes
    # The decode kept the hit it read: the prefill sent back only the pages past it.
    pe_side_pd = pe_side.model_bytes - before.model_bytes
    assert de_side.model_bytes - pe_side.model_bytes == pe_side_pd - hit // 64 * page_bytes


def test_a_helper_de_reads_its_part_of_a_split_read_for_the_prefill(servers: dict) -> None:
    import torch
    from dualpath.srt.hicache import page_geometry
    from dualpath.srt.link import KVLink

    ids = _prompt(7)
    expected, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    hit = 64 * len(_stored(servers, ids))
    _flush(servers)
    root = servers["store"]
    # A third node's DE KV channel (the DE side of the plugin without a server): the tiny model's SGLang page.
    geometry = page_geometry(surface.PoolShape("layer_first", torch.float32, "mha", 2, 2, 64, 64), "tiny_llama")
    store = BlockStore(StoreConfig(root, model=geometry, block_tokens=64, node="de1"))
    assert (root / store.config.namespace).is_dir()  # the servers' namespace: the same pages
    helper = KVLink(SrtConfig("decode", "de1", str(root), "127.0.0.1", 31390, timeout_s=3.0),
                    (slots := BlockSlots(store.layout, 16, 3.0)), slots.from_store(store))
    try:
        before = {n: _node_read_tokens(root, n) for n in ("pe0", "de0", "de1")}
        pe, de = _channels(servers)
        out, prefill_meta = _pd_generate(servers, ids, RouteHint(ReadSide.SPLIT, pe, de, 64,
                                                                 helper.config.kv_channel, 128))
        read = {n: _node_read_tokens(root, n) - before[n] for n in ("pe0", "de0", "de1")}
    finally:
        helper.close()
        store.close()
    assert same_logprobs(out, expected)
    assert prefill_meta["cached_tokens_details"]["storage"] == hit
    assert read == {"pe0": hit - 192, "de0": 64, "de1": 128}

    # A helper that is gone (its channel closed above): the prefill reads the helper's part itself.
    _flush(servers)
    before = {n: _node_read_tokens(root, n) for n in ("pe0", "de0", "de1")}
    out, prefill_meta = _pd_generate(servers, ids, RouteHint(ReadSide.SPLIT, pe, de, 64, helper.config.kv_channel, 128))
    read = {n: _node_read_tokens(root, n) - before[n] for n in ("pe0", "de0", "de1")}
    assert same_logprobs(out, expected)
    assert prefill_meta["cached_tokens_details"]["storage"] == hit
    assert read == {"pe0": hit - 64, "de0": 64, "de1": 0}


def wrong_page_changes_logprobs(servers: dict, ids: list[int], shape: surface.PoolShape, model: str) -> None:
    """The logprob oracle's negative control: once the stored pages of ``ids`` hold page 1 with its values negated
    (rewritten through the store: valid checksums), the PE path reads them as a hit and the logprobs change."""
    import numpy as np
    from dualpath.kv import BlockBuffer
    from dualpath.srt.hicache import page_geometry
    from dualpath.store import BlockStatus, drop_all_blocks

    stock = _stock(servers, ids)
    _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    keys = _stored(servers, ids)
    store = BlockStore(StoreConfig(servers["store"], model=page_geometry(shape, model), block_tokens=64, node="test"))
    try:
        assert store.config.namespace == servers["decode"].report().store_namespace
        buffer = BlockBuffer(store.layout, len(keys))
        assert store.read(keys, buffer.blocks(range(len(keys)))) == [BlockStatus.OK] * len(keys)
        page = buffer.block(1).view(np.dtype(str(shape.dtype).removeprefix("torch.")))
        page[:] = -page
        drop_all_blocks(servers["store"])
        assert store.write(keys, buffer.blocks(range(len(keys)))) == [BlockStatus.OK] * len(keys)
    finally:
        store.close()
    _flush(servers)
    out, prefill_meta = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    assert prefill_meta["cached_tokens_details"]["storage"] == 64 * len(keys)  # read as a valid hit
    assert not same_logprobs(out, stock)


def test_a_page_with_a_valid_checksum_but_wrong_content_changes_the_logprobs(servers: dict) -> None:
    import torch

    wrong_page_changes_logprobs(servers, _prompt(8), surface.PoolShape("layer_first", torch.float32, "mha", 2, 2, 64,
                                                                       64), "tiny_llama")


def test_the_compute_quota_bounds_every_prefill_batch(servers: dict) -> None:
    ids = _prompt(5)
    out, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    assert same_logprobs(out, _stock(servers, ids))  # chunking by the quota changes no output
    log = servers["prefill"].log_path.read_text()
    batches = [int(m) for m in re.findall(r"Prefill batch.*?#new-token: (\d+)", log)]
    assert batches and max(batches) <= QUOTA_TOKENS
    assert QUOTA_TOKENS in batches  # a 301-token prompt needed full-quota chunks


def test_stalled_forwarding_falls_back_to_the_pe_read(servers: dict) -> None:
    ids = _prompt(3)
    expected, _ = _pd_generate(servers, ids, RouteHint(ReadSide.PE))
    hit = 64 * len(_stored(servers, ids))
    _flush(servers)
    # A DE channel that accepts the PE's request and never writes: the PE gives up after its timeout.
    silent = KVChannel(TransferConfig("silent-de", timeout_s=3.0))
    try:
        before = _node_read_tokens(servers["store"], "pe0")
        stalled = f"silent-de@{silent.address.removeprefix('tcp://')}"
        out, prefill_meta = _pd_generate(servers, ids, RouteHint(ReadSide.DE, _channels(servers)[0], stalled))
    finally:
        silent.close()
    assert same_logprobs(out, expected)
    assert prefill_meta["cached_tokens_details"]["storage"] == hit
    assert _node_read_tokens(servers["store"], "pe0") - before == hit


def test_launch_fails_loudly_on_a_wrong_hook_target(tmp_path: Path) -> None:
    script = ("import sys; import dualpath.srt.surface as t; "
              "t.TARGETS['page_transfer'] = 'sglang.srt.managers.cache_controller.HiCacheController.gone'; "
              "from dualpath.launch_server import main; main(sys.argv[1:])")
    result = subprocess.run([sys.executable, "-c", script, "--model-path", "x"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0
    assert "'page_transfer'" in result.stderr and "HiCacheController.gone" in result.stderr



def test_the_block_store_backend_takes_only_store_keys_and_plays_no_dualpath_role() -> None:
    from dualpath.srt.config import BACKEND, PLAIN_BACKEND

    extra = {**PLAIN_BACKEND, "store_root": "/s", "node": "pe1", "nic_gbps": 0.5, "prefetch_threshold": 64}
    config = SrtConfig.plain(extra, "m", tp_rank=1, tp_size=2)
    assert (config.role, config.store_root, config.node, config.nic_gbps, config.tp_rank) == ("null", "/s", "pe1",
                                                                                             0.5, 1)
    assert SrtConfig.from_extra_config(extra, "prefill", "m", 64, "127.0.0.1") is None  # the plugin stays off
    with pytest.raises(ValueError, match="unknown block-store backend extra-config keys \\['kv_port'\\]"):
        SrtConfig.plain({**extra, "kv_port": 5000}, "m", 0, 1)  # a DualPath key: no KV channel here
    with pytest.raises(ValueError, match="nic_gbps"):
        SrtConfig.plain({**extra, "nic_gbps": -1}, "m", 0, 1)
    assert PLAIN_BACKEND["backend_name"] != BACKEND["backend_name"]


def test_traffic_flags_reach_the_kv_channel_and_the_emulated_nic() -> None:
    from dualpath.srt.launch import dualpath_parser, extra_config
    from dualpath.srt.traffic import KV_GRANT_BYTES, compute_nic, kv_qos

    args = dualpath_parser().parse_args(["--dualpath-kv-ib-sl", "2", "--dualpath-kv-dscp", "10",
                                         "--dualpath-compute-gbps", "1.5", "--dualpath-wait-all-layers"])
    extra = json.loads(extra_config(args, None))
    assert (extra["kv_ib_sl"], extra["kv_dscp"], extra["compute_gbps"], extra["layerwise"]) == (2, 10, 1.5, False)
    config = SrtConfig.from_extra_config(extra, "decode", "m", 64, "127.0.0.1")
    # The KV channel's UCX agent: its own IB service level and RoCE traffic class (DSCP 10 << 2).
    assert kv_qos(config).ucx_env() == {"UCX_IB_SL": "2", "UCX_IB_TRAFFIC_CLASS": "40"}
    link = compute_nic(config)
    assert link is not None and link.path.name == config.node and link.gbps == 1.5
    assert link.max_grant_bytes == KV_GRANT_BYTES
    assert compute_nic(SrtConfig("prefill")) is None  # not emulated unless asked
    for bad in ({"kv_ib_sl": 16}, {"kv_dscp": 64}, {"compute_gbps": 0}, {"compute_nic": "../x"}):
        with pytest.raises(ValueError):
            SrtConfig.from_extra_config({**extra, **bad}, "decode", "m", 64, "127.0.0.1")


def test_the_servers_give_sglang_the_clients_routing_key_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from dualpath.srt import requests

    routes = requests.RequestRoutes(64)
    monkeypatch.setattr(surface, "storage_backend", lambda owner: SimpleNamespace(routes=routes))
    seen = []
    for key in ("session-7;a=b", ""):
        req = SimpleNamespace(rid=f"r{key}", bootstrap_room=1, origin_input_ids=list(range(130)),
                              routing_key=RouteHint(ReadSide.DE, PE, DE, client_key=key).encode())
        requests.on_add_request(lambda scheduler, r: seen.append(routes.current().hint), object(), req)
        assert req.routing_key == (key or None)  # SGLang's per-key metrics see the client's key (or none)
    assert [hint.side for hint in seen] == [ReadSide.DE, ReadSide.DE]  # the request still reads on the DE side
    stock = SimpleNamespace(rid="s", bootstrap_room=1, origin_input_ids=[1], routing_key="user-key")
    requests.on_add_request(lambda scheduler, r: None, object(), stock)
    assert stock.routing_key == "user-key"  # not a DualPath key (a stock router's client): left alone
