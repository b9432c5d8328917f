"""The simulator calibrated on measured runs: a cost model fitted on one shape predicts another, a wrong one does
not, round-by-round replay keeps rounds apart, and `dualpath ab`'s records load as they were measured."""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
from dualpath.cli import main as cli_main
from dualpath.cluster.local import ClusterConfig
from dualpath.scheduler import Request
from dualpath.sim.calibrate import Calibration, MeasuredAB, ModeRun, fit, predict, replay
from dualpath.sim.runner import run_rounds

RESULTS = Path(__file__).resolve().parent.parent / "benchmark" / "results"
TRUTH = Calibration(prefill_overhead_s=0.08, prefill_per_token_s=4e-5, prefill_per_pair_s=2e-8, decode_base_s=0.015,
                    decode_per_request_s=0.001, storage_efficiency=0.9)


def rounds(seed: int, count: int = 6, agents: int = 12) -> tuple[tuple[Request, ...], ...]:
    """Agent turns as ``dualpath ab`` sends them: a long stored context and a few new tokens each."""
    rng = random.Random(seed)
    ids = iter(range(10**6))
    return tuple(tuple(Request(next(ids), rng.randint(300, 1500), rng.randint(5, 60), 16) for _ in range(agents))
                 for _ in range(count))


def measured(prefill: int, decode: int, nic_gbps: float, seed: int, truth: Calibration = TRUTH) -> MeasuredAB:
    """What a cluster whose costs are ``truth`` would have measured (its runs simulated with them)."""
    shell = MeasuredAB(f"{prefill}p{decode}d-{nic_gbps:g}", "dualpath ab", prefill, decode, nic_gbps, 2048,
                       ClusterConfig.prefill_tokens_per_s,
                       *(ModeRun(mode, rounds(seed), 1.0, 1.0, 1.0, (), ()) for mode in ("stock", "split")))
    cap = shell.cap_bytes_per_s

    def mode_run(empty: ModeRun) -> ModeRun:
        result = run_rounds(truth.spec(shell, empty.sim_mode), empty.rounds)
        tokens = sum(r.new_tokens + r.gen_tokens for requests in empty.rounds for r in requests)
        samples = tuple((batch, truth.decode_base_s + truth.decode_per_request_s * batch) for batch in (4, 8, 12))
        return replace(empty, makespan_s=result.makespan_s, tokens_per_s=tokens / result.makespan_s,
                       ttft_p50_s=statistics.median(result.ttft_s), busy_rates=(truth.storage_efficiency * cap,),
                       decode_samples=samples)

    return replace(shell, a=mode_run(shell.a), b=mode_run(shell.b))


def test_a_model_fitted_on_1p1d_predicts_1p2d_and_a_wrong_one_does_not() -> None:
    calibration = fit([measured(1, 1, 0.005, seed=1), measured(1, 1, 1.0, seed=2)], max_evaluations=160)
    held_out = measured(1, 2, 0.005, seed=3)
    (prediction,) = predict(calibration, [held_out])
    assert held_out.measured_ratio > 1.5  # DualPath gains there: the prediction has something to get right
    assert prediction.ratio == pytest.approx(held_out.measured_ratio, rel=0.1)
    assert prediction.b.ttft_p50_s == pytest.approx(held_out.b.ttft_p50_s, rel=0.1)
    assert calibration.storage_efficiency == pytest.approx(TRUTH.storage_efficiency, rel=0.1)
    # Negative control: NICs twice as fast as measured mispredict the storage-bound TTFT by far more.
    wrong = replace(calibration, storage_efficiency=2 * calibration.storage_efficiency)
    assert replay(wrong, held_out, held_out.b).ttft_p50_s < 0.7 * held_out.b.ttft_p50_s


def test_rounds_are_replayed_one_after_the_other() -> None:
    run = measured(1, 1, 0.005, seed=4)
    spec = TRUTH.spec(run, "baseline")
    one = run_rounds(spec, run.a.rounds[:1])
    both = run_rounds(spec, run.a.rounds[:1] * 2)  # the same requests again once the first round is answered
    assert len(both.ttft_s) == 2 * len(one.ttft_s) and both.round_s[0] == one.round_s[0]
    assert both.makespan_s == pytest.approx(2 * one.makespan_s, rel=0.05)
    assert run_rounds(spec, [()]).round_s == (0.0,)


def test_an_ab_run_loads_as_measured() -> None:
    run = MeasuredAB.load(RESULTS / "cluster_ab_1p2d.runs.json")
    raw = json.loads((RESULTS / "cluster_ab_1p2d.runs.json").read_text())
    assert (run.prefill, run.decode, run.nic_gbps, run.bytes_per_token) == (1, 2, 0.005, 2048)
    assert (run.a.mode, run.b.mode, run.a.sim_mode) == ("stock", "split", "baseline")
    for mode, record in zip((run.a, run.b), raw, strict=True):
        ok = [r for r in record["records"] if r["ok"]]
        assert sum(map(len, mode.rounds)) == len(ok)
        tokens = sum(r.new_tokens + r.gen_tokens for requests in mode.rounds for r in requests)
        assert tokens / mode.makespan_s == pytest.approx(record["tokens_per_s"], rel=1e-9)
        assert len({r.request_id for requests in mode.rounds for r in requests}) == len(ok)
    # The ratio `dualpath ab` recorded for the run (its throughput record in <name>.json).
    [recorded] = [r["ratio"] for r in json.loads((RESULTS / "cluster_ab_1p2d.json").read_text())
                  if r["metric"] == "throughput"]
    assert run.measured_ratio == pytest.approx(recorded, rel=1e-9)


def test_bad_input_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"runs\.json"):
        MeasuredAB.load(RESULTS / "cluster_ab_1p2d.json")
    (tmp_path / "lonely.runs.json").write_text("[]")
    with pytest.raises(ValueError, match=r"lonely\.json: not found"):
        MeasuredAB.load(tmp_path / "lonely.runs.json")
    with pytest.raises(SystemExit, match="--predict needs --calibrate RUNS or --calibration FILE"):
        cli_main(["simulate", "--predict", str(RESULTS / "cluster_ab_1p2d.runs.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"lonely\.json: not found"):
        cli_main(["simulate", "--calibrate", str(tmp_path / "lonely.runs.json"), "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.calibration.json"))


def test_calibrate_then_predict_writes_records_and_a_calibration_that_reloads(tmp_path: Path) -> None:
    assert cli_main(["simulate", "--calibrate", str(RESULTS / "cluster_ab.runs.json"), "--predict",
                     str(RESULTS / "cluster_ab_1p2d.runs.json"), "--out", str(tmp_path), "--name", "p"]) == 0
    records = json.loads((tmp_path / "p.json").read_text())
    assert {r["metric"] for r in records} == {"throughput_ratio[cluster_ab_1p2d]", "ttft_p50[cluster_ab_1p2d][stock]",
                                              "ttft_p50[cluster_ab_1p2d][split]"}
    for record in records:
        assert record["ratio"] == pytest.approx(record["value"] / record["baseline_value"])
        assert record["command"].startswith("dualpath simulate --calibrate")
    assert (tmp_path / "p.png").stat().st_size > 0
    reloaded = Calibration.load(tmp_path / "p.calibration.json")
    assert reloaded.fitted_on == ("cluster_ab",)
    (again,) = predict(reloaded, [MeasuredAB.load(RESULTS / "cluster_ab_1p2d.runs.json")])
    ratio = next(r for r in records if r["metric"].startswith("throughput_ratio"))["value"]
    assert again.ratio == pytest.approx(ratio)
