"""Calibrate the simulator on a real cluster's ``dualpath ab`` runs, then predict runs it did not see.

``dualpath ab`` writes, per run, ``<name>.json`` (records whose ``command`` gives the cluster's shape) and
``<name>.runs.json`` (both modes' measured requests: round, prompt, hit and output tokens, TTFT, token intervals;
each node's storage-NIC bytes over time). The simulator then stands for that cluster: one engine per node, each
node's NIC at the run's cap times a fitted efficiency, the router's own scheduler thresholds, and a cost model
of the served model on that hardware:

- prefill forward: ``overhead + per_token x new tokens + per_pair x attended (query, key) pairs``;
- decode step: ``base + per_request x batch``;
- storage NIC: ``efficiency x cap``.

:func:`fit` takes the NIC efficiency from the rate each NIC kept while busy and the decode step from the token
intervals, then searches the prefill constants (Nelder-Mead in log space) so that the simulator, replaying the
calibration runs round by round (:func:`dualpath.sim.runner.run_rounds`), gives their measured makespan and
TTFT p50 in both modes. :func:`predict` replays other runs (another shape, regime or policy) with the fitted model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import minimize

from dualpath.kv import KVGeometry
from dualpath.router.decide import SPLIT_BLOCK_TOKENS
from dualpath.scheduler import Request, SchedulerConfig
from dualpath.scheduler.modes import get_mode
from dualpath.sim.cluster import ClusterSpec
from dualpath.sim.hardware import HardwareSpec, ModelSpec
from dualpath.sim.runner import RoundsResult, run_rounds

KV_BYTES_PER_S = 2e9  # PD and DE->PE KV on loopback: never the bottleneck of the CPU cluster
NO_TOPK = 1 << 40  # dense attention: every prefix token attended
BUSY_FLOOR = 0.5  # a timeline interval counts as busy above this share of the cap


@dataclass(frozen=True)
class ModeRun:
    """One mode of one measured A/B: its requests by round and what it measured."""

    mode: str  # the A/B's label: stock, stock-router, baseline, dualpath, split
    rounds: tuple[tuple[Request, ...], ...]
    makespan_s: float
    tokens_per_s: float
    ttft_p50_s: float
    busy_rates: tuple[float, ...]  # bytes/s of each NIC over each of its busy stretches
    decode_samples: tuple[tuple[float, float], ...]  # (requests decoding per decode server, median interval s)

    @property
    def sim_mode(self) -> str:
        """The simulator's mode: the stock stacks read every hit on the prefill side, as baseline mode does."""
        return "baseline" if self.mode in ("stock", "stock-router") else self.mode


@dataclass(frozen=True)
class MeasuredAB:
    """A ``dualpath ab`` run as its records give it."""

    name: str
    command: str
    prefill: int
    decode: int
    nic_gbps: float
    bytes_per_token: int
    prefill_tokens_per_s: float  # the router's beta rate, as the run's cluster configured it
    a: ModeRun
    b: ModeRun

    @property
    def cap_bytes_per_s(self) -> float:
        return self.nic_gbps * 1e9 / 8

    @property
    def measured_ratio(self) -> float:
        return self.b.tokens_per_s / self.a.tokens_per_s

    @classmethod
    def load(cls, runs_path: Path) -> MeasuredAB:
        """``<name>.runs.json`` and, beside it, ``<name>.json`` (for the command that ran it)."""
        if not runs_path.name.endswith(".runs.json"):
            raise ValueError(f"expected a dualpath ab <name>.runs.json, got {runs_path}")
        name = runs_path.name.removesuffix(".runs.json")
        records_path = runs_path.with_name(f"{name}.json")
        try:
            runs, records = json.loads(runs_path.read_text()), json.loads(records_path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"{exc.filename}: not found (a dualpath ab run writes <name>.json and "
                             "<name>.runs.json side by side)") from None
        command = next((r.get("command", "") for r in records if r.get("command", "").startswith("dualpath ab")), "")
        if not command or len(runs) != 2:
            raise ValueError(f"{records_path} and {runs_path} are not the records of a closed-loop dualpath ab run")
        # The command read by ``dualpath ab``'s own parser, so that its defaults are the run's (imported here: the
        # cluster package is needed only to read a run).
        from dualpath.cluster import cli
        from dualpath.cluster.local import ClusterConfig

        parser = argparse.ArgumentParser()
        cli.register(parser.add_subparsers())
        args = parser.parse_args(shlex.split(command)[1:])
        return cls(name, command, args.prefill, args.decode, cli.nic_gbps(args), args.kv_bytes_per_token,
                   ClusterConfig.prefill_tokens_per_s, *(_mode_run(run, args.decode) for run in runs))


def _mode_run(run: dict[str, Any], decodes: int) -> ModeRun:
    records = [r for r in run["records"] if r["ok"]]
    by_round: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_round.setdefault(record["turn"], []).append(record)
    rounds, next_id = [], 0
    decode_samples = []
    for turn in sorted(by_round):
        requests = []
        for record in by_round[turn]:
            hit = record["context_tokens"]
            requests.append(Request(next_id, hit, max(1, record["prompt_tokens"] - hit), record["output_tokens"]))
            next_id += 1
            if record["token_intervals_s"]:
                decode_samples.append((len(by_round[turn]) / decodes, statistics.median(record["token_intervals_s"])))
        rounds.append(tuple(requests))
    return ModeRun(run["mode"], tuple(rounds), run["makespan_s"], run["tokens_per_s"], run["ttft_p50_s"],
                   tuple(_busy_rates(run["nic_timeline"])), tuple(decode_samples))


def _busy_rates(timelines: dict[str, list[list[float]]]) -> list[float]:
    """Each NIC's rate over its busy stretches (consecutive samples that all moved bytes), one per stretch."""
    rates = []
    for samples in timelines.values():
        steps = [(t1 - t0, b1 - b0) for (t0, b0), (t1, b1) in itertools.pairwise(samples) if t1 > t0]
        stretch_s = stretch_bytes = 0.0
        for seconds, moved in [*steps, (0.0, 0)]:
            if moved > 0:
                stretch_s, stretch_bytes = stretch_s + seconds, stretch_bytes + moved
            elif stretch_s > 0:
                rates.append(stretch_bytes / stretch_s)
                stretch_s = stretch_bytes = 0.0
    return rates


@dataclass(frozen=True)
class Calibration:
    """The cost model of a served model on a cluster's hardware, as fitted by :func:`fit`."""

    prefill_overhead_s: float
    prefill_per_token_s: float
    prefill_per_pair_s: float
    decode_base_s: float
    decode_per_request_s: float
    storage_efficiency: float
    fitted_on: tuple[str, ...] = ()
    fit_error: float = 0.0  # the objective at the optimum: mean squared log error of makespan and TTFT p50
    commands: tuple[str, ...] = ()

    def spec(self, run: MeasuredAB, mode: str) -> ClusterSpec:
        """The simulated copy of ``run``'s cluster in ``mode``."""
        model = ModelSpec(
            "measured", KVGeometry("measured", 1, run.bytes_per_token, "float32", "mha", 1, 1),
            active_params=self.prefill_per_token_s / 2, attn_flops_per_pair=self.prefill_per_pair_s,
            indexer_flops_per_pair=0.0, topk=NO_TOPK, mfu=1.0, forward_overhead_s=self.prefill_overhead_s,
            decode_base_s=self.decode_base_s, decode_per_request_s=self.decode_per_request_s,
            decode_per_context_token_s=0.0, de_hbm_tokens=1 << 40, basic_pe_hbm_tokens=1 << 40)
        hardware = HardwareSpec(gpus_per_node=1, snic_bps=run.cap_bytes_per_s, cnic_bps=KV_BYTES_PER_S,
                                storage_efficiency=self.storage_efficiency, kv_cnic_share=1.0, peak_flops=1.0)
        thresholds = SchedulerConfig.profiled(run.cap_bytes_per_s / run.bytes_per_token, run.prefill_tokens_per_s,
                                              split_block_tokens=SPLIT_BLOCK_TOKENS)
        return ClusterSpec(run.prefill, run.decode, model, get_mode(mode), hardware, fetch_interval_s=0.001,
                           scheduler=thresholds, role_groups=True)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        data = json.loads(path.read_text())
        return cls(**{**data, "fitted_on": tuple(data["fitted_on"]), "commands": tuple(data["commands"])})


class Replayed(NamedTuple):
    """A mode of a run, simulated."""

    tokens_per_s: float
    ttft_p50_s: float
    makespan_s: float


def replay(calibration: Calibration, run: MeasuredAB, measured: ModeRun) -> Replayed:
    result: RoundsResult = run_rounds(calibration.spec(run, measured.sim_mode), measured.rounds)
    tokens = sum(r.new_tokens + r.gen_tokens for requests in measured.rounds for r in requests)
    return Replayed(tokens / result.makespan_s, float(np.median(result.ttft_s)), result.makespan_s)


def fit(runs: list[MeasuredAB], max_evaluations: int = 200) -> Calibration:
    """The cost model that replays ``runs`` (both modes of each) closest to what they measured."""
    if not runs:
        raise ValueError("fit needs at least one measured run")
    modes = [mode for run in runs for mode in (run.a, run.b)]
    rates = [rate / run.cap_bytes_per_s for run in runs for mode in (run.a, run.b) for rate in mode.busy_rates
             if rate >= BUSY_FLOOR * run.cap_bytes_per_s]
    efficiency = statistics.median(rates) if rates else 1.0
    batch, interval = zip(*[sample for mode in modes for sample in mode.decode_samples], strict=True)
    per_request, base = np.polyfit(batch, interval, 1) if len(set(batch)) > 1 else (0.0, statistics.median(interval))
    per_request, base = max(0.0, float(per_request)), max(1e-4, float(base))

    def calibration(log_params: np.ndarray, error: float = 0.0) -> Calibration:
        overhead, per_token, per_pair, nic_share = np.exp(log_params)
        return Calibration(float(overhead), float(per_token), float(per_pair), base, per_request, float(nic_share),
                           tuple(run.name for run in runs), error, tuple(run.command for run in runs))

    def objective(log_params: np.ndarray) -> float:
        model = calibration(log_params)
        errors = []
        for run in runs:
            for measured in (run.a, run.b):
                simulated = replay(model, run, measured)
                errors += [math.log(simulated.makespan_s / measured.makespan_s),
                           math.log(max(simulated.ttft_p50_s, 1e-6) / max(measured.ttft_p50_s, 1e-6))]
        return float(np.mean(np.square(errors)))

    # The replay is piecewise constant in places (whole batches, whole rounds), where a simplex stalls: first the
    # prefill constants at the efficiency the NICs showed, then all four from there.
    options = {"maxfev": max_evaluations // 2, "xatol": 0.02, "fatol": 1e-4}
    compute = minimize(lambda x: objective(np.append(x, math.log(efficiency))),
                       np.log([0.05, 1 / runs[0].prefill_tokens_per_s, 1e-8]), method="Nelder-Mead", options=options)
    start = np.append(compute.x, math.log(efficiency))
    best = minimize(objective, start, method="Nelder-Mead", options=options)
    return calibration(best.x, float(best.fun)) if best.fun < compute.fun else calibration(start, float(compute.fun))


class Prediction(NamedTuple):
    run: MeasuredAB
    a: Replayed
    b: Replayed

    @property
    def ratio(self) -> float:
        return self.b.tokens_per_s / self.a.tokens_per_s


def predict(calibration: Calibration, runs: list[MeasuredAB]) -> list[Prediction]:
    return [Prediction(run, replay(calibration, run, run.a), replay(calibration, run, run.b)) for run in runs]
