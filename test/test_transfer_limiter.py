"""The node-wide priority limiter and the traffic-class configuration."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from pathlib import Path

import pytest
from dualpath.transfer import FabricQos, LimiterConfig, PriorityLimiter, TrafficClass, TransferConfig
from dualpath.transfer.limiter import MODEL_GRACE_S
from hypothesis import given, settings
from hypothesis import strategies as st

MODEL, KV = TrafficClass.MODEL, TrafficClass.KV
RATE = 1e9  # bytes/s: 8 Gbps


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def limiter(tmp_path: Path, clock: FakeClock, **kwargs: float) -> PriorityLimiter:
    return PriorityLimiter(LimiterConfig(tmp_path / "node.lim", gbps=RATE * 8 / 1e9, **kwargs), clock, clock.sleep)


def test_grants_follow_the_rate_on_one_timeline(tmp_path: Path) -> None:
    clock = FakeClock()
    lim = limiter(tmp_path, clock)
    starts = [lim.reserve(1_000_000, MODEL) for _ in range(3)]
    assert starts == pytest.approx([100.0, 100.001, 100.002])
    clock.now = 101.0  # long after: the timeline is idle, KV gets the link at once
    assert lim.reserve(1_000_000, KV) == pytest.approx(101.0)


def test_kv_waits_behind_model_traffic_then_is_promoted(tmp_path: Path) -> None:
    clock = FakeClock()
    lim = limiter(tmp_path, clock, promote_after_s=0.01)
    lim.reserve(5_000_000, MODEL)  # busy for 5 ms
    assert lim.reserve(1000, KV) is None
    assert lim.reserve(1000, KV, waited_s=0.009) is None
    start = lim.reserve(1000, KV, waited_s=0.01)
    assert start == pytest.approx(100.005)  # promoted, but still after the model grant on the timeline
    assert lim.stats().promotions == 1


def test_model_waits_are_told_apart_by_what_they_waited_for(tmp_path: Path) -> None:
    clock = FakeClock()
    lim = limiter(tmp_path, clock)
    lim.reserve(1_000_000, KV)  # the link is KV's for 1 ms
    lim.reserve(2_000_000, MODEL)  # waits 1 ms behind KV, then 2 ms on the link
    lim.reserve(1_000_000, MODEL)  # waits 3 ms: 1 ms of it behind KV, 2 behind the first model grant
    stats = lim.stats()
    waits = (stats.model_busy_s, stats.model_waited_s, stats.model_waited_for_kv_s)
    assert waits == pytest.approx((0.003, 0.004, 0.002))
    assert stats.model_share == pytest.approx(3 / 7)
    assert stats.model_share_left_by_kv == pytest.approx(3 / 5)
    clock.now = 101.0
    lim.reserve(1_000_000, MODEL)  # an idle link: no wait at all
    assert lim.stats().model_waited_s == pytest.approx(0.004)


def test_acquire_sleeps_until_model_traffic_is_idle(tmp_path: Path) -> None:
    clock = FakeClock()
    lim = limiter(tmp_path, clock, promote_after_s=1.0)
    lim.reserve(2_000_000, MODEL)
    lim.acquire(3_000_000, KV)  # split into 1 MiB grants after the model burst and its grace period
    assert clock.now >= 100.002 + MODEL_GRACE_S
    stats = lim.stats()
    assert (stats.model_bytes, stats.kv_bytes, stats.promotions) == (2_000_000, 3_000_000, 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([MODEL, KV]), st.integers(1, 1 << 20), st.floats(0, 0.003)), max_size=40))
def test_grants_never_overlap_and_model_waits_at_most_one_kv_grant(tmp_path_factory, requests) -> None:
    clock = FakeClock()
    lim = limiter(tmp_path_factory.mktemp("lim"), clock, promote_after_s=0.002)
    intervals, model_backlog_end = [], clock.now
    for traffic, nbytes, gap in requests:
        clock.now += gap
        asked = clock.now
        start = lim.reserve(nbytes, traffic, waited_s=0.0 if traffic is MODEL else 1.0)
        assert start is not None and start >= asked
        if traffic is MODEL:
            # Non-preemptive priority: behind earlier model bytes and at most one KV grant.
            assert start <= max(asked, model_backlog_end) + (1 << 20) / RATE + 1e-9
            model_backlog_end = start + nbytes / RATE
        intervals.append((start, start + nbytes / RATE))
        clock.now = start  # the caller sleeps until its grant starts before asking again
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end - 1e-9


def _reserve_in_child(path: str) -> None:
    lim = PriorityLimiter(LimiterConfig(Path(path), gbps=8))
    lim.reserve(4096, MODEL)
    lim.reserve(1024, KV, waited_s=1.0)
    lim.close()


def test_state_is_shared_by_the_processes_of_a_node(tmp_path: Path) -> None:
    path = tmp_path / "node.lim"
    mine = PriorityLimiter(LimiterConfig(path, gbps=8))
    child = mp.get_context("spawn").Process(target=_reserve_in_child, args=(str(path),))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    stats = mine.stats()
    assert (stats.model_bytes, stats.kv_bytes) == (4096, 1024)
    mine.close()


def test_bad_limiter_input_is_rejected(tmp_path: Path) -> None:
    lim = limiter(tmp_path, FakeClock(), max_grant_bytes=1000)
    with pytest.raises(ValueError, match="nbytes must be positive"):
        lim.reserve(0, MODEL)
    with pytest.raises(ValueError, match="at most 1000 bytes"):
        lim.reserve(1001, KV)
    assert lim.stats().kv_bytes == 0
    for bad in ({"gbps": 0}, {"gbps": 1, "promote_after_s": 0}, {"gbps": 1, "max_grant_bytes": 0}):
        with pytest.raises(ValueError):
            LimiterConfig(tmp_path / "x", **bad)


def test_fabric_qos_maps_to_ucx_environment() -> None:
    assert FabricQos(ib_sl=2).ucx_env() == {"UCX_IB_SL": "2"}
    assert FabricQos.roce_dscp(10).ucx_env() == {"UCX_IB_TRAFFIC_CLASS": "40"}
    assert FabricQos(extra_env={"UCX_RC_TIMEOUT": "2s"}).ucx_env() == {"UCX_RC_TIMEOUT": "2s"}
    for bad in ({"ib_sl": 16}, {"traffic_class": 256}, {"extra_env": {"PATH": "/"}}):
        with pytest.raises(ValueError):
            FabricQos(**bad)
    with pytest.raises(ValueError, match="dscp"):
        FabricQos.roce_dscp(64)
    for bad_cfg in ({"name": "a b"}, {"name": "a", "timeout_s": 0}, {"name": "a", "port": 70000}):
        with pytest.raises(ValueError):
            TransferConfig(**bad_cfg)


def test_agent_applies_class_environment_only_while_it_is_created(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nixl")
    from dualpath.transfer.agent import KVAgent

    monkeypatch.delenv("UCX_IB_SL", raising=False)
    monkeypatch.setenv("UCX_IB_TRAFFIC_CLASS", "0")
    agent = KVAgent(TransferConfig("qos-test", qos=FabricQos(ib_sl=3, traffic_class=96)))
    try:
        assert "UCX_IB_SL" not in os.environ and os.environ["UCX_IB_TRAFFIC_CLASS"] == "0"
        assert agent.traffic_class is TrafficClass.KV and agent.live() == (0, 0, 0, 0)
    finally:
        agent.close()
