"""matplotlib figures of simulator results (Agg backend: files only, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dualpath.sim.runner import RunResult

Points = tuple[Sequence[float], Sequence[float]]  # xs, ys


def bar_chart(path: Path, title: str, labels: Sequence[str], values: Sequence[float], ylabel: str,
              reference: Sequence[float | None] | None = None, reference_label: str = "paper") -> Path:
    """One bar per label; `reference` (the paper's values, or measured ones; None where there is none) drawn
    beside ours."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 2), 3.6))
    xs = range(len(labels))
    width = 0.4 if reference else 0.7
    ax.bar([x - (width / 2 if reference else 0) for x in xs], values, width, label="simulated")
    if reference:
        ax.bar([x + width / 2 for x in xs], [r or 0.0 for r in reference], width, label=reference_label)
        ax.legend()
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_chart(path: Path, title: str, panels: dict[str, dict[str, Points]], ylabel: str,
               reference: dict[str, Points] | None = None, logx: bool = False) -> Path:
    """One panel per x-axis label (the keys of `panels`) with one line per series; `reference` (the paper's
    readings) as crosses on every panel. Ticks sit at the measured xs: sweeps use a few chosen values."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 3.8), squeeze=False, sharey=True)
    for ax, (xlabel, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        for label, (xs, ys) in (reference or {}).items():
            ax.plot(xs, ys, marker="x", markersize=9, linestyle="none", color="black", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel(xlabel)
        ax.legend()
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def offline_chart(path: Path, results: Sequence[RunResult]) -> Path:
    return bar_chart(path, f"Offline JCT ({results[0].setting})", [r.mode for r in results],
                     [r.makespan_s for r in results], "JCT (s)")


def online_chart(path: Path, sweeps: dict[str, Sequence[RunResult]], aps: dict[str, Sequence[float]]) -> Path:
    """Mean TTFT against agents/s per mode, with the 4 s SLO line."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, results in sweeps.items():
        points = sorted(zip(aps[mode], (r.mean_ttft_s for r in results), strict=True))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    ax.axhline(4.0, color="grey", linestyle="--", label="SLO 4 s")
    ax.set_yscale("log")
    ax.set_xlabel("agents per second")
    ax.set_ylabel("mean TTFT (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
