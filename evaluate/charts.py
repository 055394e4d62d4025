"""The report's charts beside the confusion matrices (:mod:`.plots`): learning curves, per-class
F1 bars (ours beside the paper's, before and after threshold tuning), learned layer weights and
predicted-against-reference attribute scatters. Each takes plain numbers and writes one PNG
with matplotlib's Agg backend, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from conilium import CLASS_NAMES
from conilium.util import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def class_legend(labels: Sequence[str]) -> str:
    """``A Angry · S Sad · …`` for the class letters in ``labels``."""
    return " · ".join(f"{c} {CLASS_NAMES[c]}" for c in labels if c in CLASS_NAMES)


def save_figure(fig, path) -> Path:
    """Write ``fig`` as PNG to ``path`` (atomically, cropped to its contents) and close it."""
    plt = pyplot()
    try:
        with atomic_path(path, suffix=".png.tmp") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.08)
    finally:
        plt.close(fig)
    return Path(path)


def learning_curves(path, curves: Sequence[Mapping], *, metric_label: str, title: str) -> Path:
    """Training loss (left) and a development metric (right) per epoch, one line per run.

    ``curves``: ``{"label", "epochs", "train_loss", "dev", "best_epoch"}`` each; the best
    epoch is marked with a star on both panels."""
    plt = pyplot()
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        color = colors(i % 10)
        ep = np.asarray(c["epochs"])
        ax_loss.plot(ep, c["train_loss"], color=color, lw=1.3, label=c["label"])
        ax_dev.plot(ep, c["dev"], color=color, lw=1.3, label=c["label"])
        best = c.get("best_epoch")
        if best is not None and best in c["epochs"]:
            k = list(c["epochs"]).index(best)
            for ax, ys in ((ax_loss, c["train_loss"]), (ax_dev, c["dev"])):
                ax.plot([best], [ys[k]], marker="*", ms=11, color=color, mec="black", mew=0.6, zorder=3)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (each run's own loss)")
    ax_dev.set_xlabel("epoch")
    ax_dev.set_ylabel(metric_label)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_dev.plot([], [], ls="", marker="*", ms=11, color="white", mec="black", label="best epoch (kept)")
    ax_dev.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _class_ticks(ax, labels: Sequence[str], support: Optional[Mapping[str, int]] = None) -> None:
    ticks = [f"{c}\n{CLASS_NAMES.get(c, c)}" + (f"\n(n={support[c]})" if support and c in support else "")
             for c in labels]
    ax.set_xticks(range(len(labels)), ticks, fontsize=8)


def per_class_bars(path, labels: Sequence[str], series: Sequence[Mapping], *, title: str,
                   support: Optional[Mapping[str, int]] = None, note: Optional[str] = None) -> Path:
    """Grouped bars of per-class F1: one group per class, one bar per series
    (``{"label", "f1": {class: value}}``; a class a series lacks has no bar)."""
    plt = pyplot()
    k, m = len(labels), max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 3.6), dpi=110)
    width = 0.8 / m
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for j, s in enumerate(series):
        xs = [i for i, c in enumerate(labels) if s["f1"].get(c) is not None]
        ys = [s["f1"][labels[i]] for i in xs]
        pos = np.asarray(xs, dtype=float) - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, ys, width=width, color=palette[j % len(palette)], label=s["label"])
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    _class_ticks(ax, labels, support)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title, fontsize=9)
    if note:
        fig.text(0.01, -0.02, note, fontsize=7, ha="left", va="top", wrap=True)
    fig.tight_layout()
    return save_figure(fig, path)


def layer_weight_bars(path, layers: Sequence[int], weights: Sequence[float], *, title: str,
                      others: Sequence[Sequence[float]] = ()) -> Path:
    """Softmax layer weights of one head as bars over the upstream's layers; the weights of
    other heads on the same layers as black dots."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 0.35 * len(layers), 3.2), dpi=110)
    x = np.arange(len(layers))
    ax.bar(x, weights, color="#4c72b0", label="this head")
    for j, w in enumerate(others):
        ax.plot(x, w, ls="", marker="o", ms=3, color="black", alpha=0.6, label="other heads" if j == 0 else None)
    ax.axhline(1.0 / len(layers), color="grey", lw=0.8, ls="--", label="uniform")
    ax.set_xticks(x, [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("upstream layer (hidden state)")
    ax.set_ylabel("learned weight (softmax)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def attribute_scatter(path, predicted: np.ndarray, reference: np.ndarray, names: Sequence[str],
                      ccc: Sequence[Optional[float]], *, title: str) -> Path:
    """Predicted against reference value, one panel per attribute (corpus scale 1–7), the
    identity line drawn; each panel's title gives its CCC."""
    plt = pyplot()
    n = len(names)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.5), dpi=110, squeeze=False)
    for k, ax in enumerate(axes[0]):
        ok = np.isfinite(predicted[:, k]) & np.isfinite(reference[:, k])
        ax.scatter(reference[ok, k], predicted[ok, k], s=6, alpha=0.35, color="#4c72b0", lw=0)
        # the 1-7 scale, widened to show every point (a prediction may leave the scale)
        shown = [v[ok, k] for v in (predicted, reference)] if ok.any() else []
        lo = min([1.0] + [float(v.min()) for v in shown]) - 0.2
        hi = max([7.0] + [float(v.max()) for v in shown]) + 0.2
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"reference {names[k]}")
        ax.set_ylabel(f"predicted {names[k]}")
        cc = "—" if ccc[k] is None else f"{ccc[k]:.3f}"
        ax.set_title(f"{names[k]}: CCC {cc}, {int(ok.sum())} clips", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def support_of(per_class: Mapping[str, Mapping]) -> Dict[str, int]:
    """Clips per reference class from a score's ``per_class``."""
    return {c: int(s.get("support", 0)) for c, s in per_class.items()}

