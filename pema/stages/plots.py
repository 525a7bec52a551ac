"""Figures logged with the runs: loss curves, the lambda schedule actually used and the systems compared
(matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict]):
    """Validation (and training) loss per check, one panel per phase; x is the epoch."""
    phases = list(dict.fromkeys(h["phase"] for h in history))
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(5 * max(1, len(phases)), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rows = [h for h in history if h["phase"] == phase]
        epochs = [h["epoch"] for h in rows]
        for key in sorted({k for h in rows for k in h if k.startswith("val_")} | {"train_loss"}):
            pts = [(e, h[key]) for e, h in zip(epochs, rows) if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=key)
        ax.set_title(phase)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def lambda_schedules(traces: dict[str, list[list[float]]]):
    """Mean lambda (and its 10-90% band over rows) per generated token, for each PEMA system."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for system, rows in traces.items():
        rows = [r for r in rows if r]
        if not rows:
            continue
        width = max(len(r) for r in rows)
        grid = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            grid[i, :len(r)] = r
        steps = np.arange(width)
        ax.plot(steps, np.nanmean(grid, 0), label=system)
        ax.fill_between(steps, np.nanpercentile(grid, 10, 0), np.nanpercentile(grid, 90, 0), alpha=0.2)
    ax.set_xlabel("generated token t")
    ax.set_ylabel("lambda (PEMA weight)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare_bars(rows: dict[str, dict]):
    """BLEU and chrF per system (``{system: {"bleu", "chrf", ...}}``), grouped bars in the mapping's order."""
    systems = list(rows)
    x = np.arange(len(systems))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(systems)), 3.8))
    for offset, (metric, label) in zip((-0.2, 0.2), (("bleu", "BLEU"), ("chrf", "chrF"))):
        values = [float(rows[s][metric]) for s in systems]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, systems, rotation=20, ha="right")
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
