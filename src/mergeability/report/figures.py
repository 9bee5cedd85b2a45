"""One PNG per analysis: readable titles, labelled axes with units, nothing interactive."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mergeability.analysis.stats import BaselineTest, BinRow  # noqa: E402
from mergeability.atomic import atomic_file  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def baseline_figure(b: BaselineTest, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(b.trials + 1)
    ax.bar(x - 0.2, b.observed, 0.4, label="observed", color="#3b6ea5")
    ax.bar(x + 0.2, b.expected, 0.4, label=f"Binomial(M={b.trials}, p̄={b.pooled_p:.2f})", color="#c8553d")
    ax.set_xticks(x, [f"{k / b.trials:.1f}" for k in x])
    ax.set_xlabel("mergeability score")
    ax.set_ylabel("updates (count)")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, path)


def bins_figure(panels: Sequence[tuple[str, list[BinRow]]], path: Path, title: str) -> Path:
    """Small multiples: per score bin, the mean of each feature with its 95 % CI and the count."""
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, bins) in zip(axes.flat, panels):
        x = np.array([b.centre for b in bins])
        y = np.array([b.mean for b in bins])
        lo = np.array([b.ci[0] for b in bins])
        hi = np.array([b.ci[1] for b in bins])
        err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])
        width = 0.8 * (x[1] - x[0]) if len(x) > 1 else 0.1
        ax.bar(x, np.nan_to_num(y), width, yerr=err, capsize=3, color="#3b6ea5")
        for xi, b in zip(x, bins):
            ax.annotate(f"n={b.count}", (xi, 0), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
        ax.set_xlabel("mergeability score")
        ax.set_ylabel(label)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def lines_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, title: str,
                 xlabel: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def scatter_figure(x: Sequence[float], y: Sequence[float], path: Path, title: str, xlabel: str, ylabel: str,
                   labels: Sequence[str] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, y, color="#3b6ea5")
    for xi, yi, lab in zip(x, y, labels or []):
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def grouped_bars_figure(groups: Sequence[str], series: dict[str, Sequence[float]], path: Path, title: str,
                        ylabel: str) -> Path:
    """One group of bars per x label (e.g. per task: base, fine-tuned, averaged, weighted)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 3.8))
    x = np.arange(len(groups))
    w = 0.8 / max(len(series), 1)
    for k, (label, ys) in enumerate(series.items()):
        ax.bar(x + (k - (len(series) - 1) / 2) * w, ys, w, label=label)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def calibration_figure(bins: Sequence[dict], pred: Sequence[float], score: Sequence[float], path: Path,
                       title: str) -> Path:
    """Out-of-fold predictions against measured scores: every update (dots) and equal-count bins (line)."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(pred, score, s=10, alpha=0.35, color="#3b6ea5", label="updates")
    ax.plot([b["pred"] for b in bins], [b["score"] for b in bins], marker="o", color="#c8553d", label="bins")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted score (out of fold)")
    ax.set_ylabel("measured mergeability score")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
