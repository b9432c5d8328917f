"""matplotlib figures of simulator results (Agg backend: files only, no display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dualpath.sim.runner import RunResult


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
