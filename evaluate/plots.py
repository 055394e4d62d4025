"""Confusion matrices as CSV and PNG (the paper's Figure 4: percent of each reference class)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from conilium import CLASS_NAMES
from conilium.util import atomic_path


def write_confusion_csv(path, matrix, labels: Sequence[str]) -> None:
    """Rows: reference class, columns: predicted class; first column ``Reference``."""
    matrix = np.asarray(matrix)
    with atomic_path(path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Reference", *labels])
            for c, row in zip(labels, matrix):
                w.writerow([c, *(f"{x:.2f}" if isinstance(x, float) or np.issubdtype(type(x), np.floating)
                                 else str(x) for x in row.tolist())])


def write_per_class_csv(path, scores: Dict) -> None:
    """``Class,Name,Precision,Recall,F1,Support`` per class, then macro and micro rows."""
    with atomic_path(path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Class", "Name", "Precision", "Recall", "F1", "Support"])
            for c, s in scores["per_class"].items():
                w.writerow([c, CLASS_NAMES.get(c, c), f"{s['precision']:.4f}", f"{s['recall']:.4f}",
                            f"{s['f1']:.4f}", s["support"]])
            w.writerow(["macro", "", "", "", f"{scores['f1_macro']:.4f}", scores["n"]])
            w.writerow(["micro", "", "", "", f"{scores['f1_micro']:.4f}", scores["n"]])


def figure_title(*parts: str, split: Optional[str] = None, width: int = 46) -> str:
    """A figure title from its parts joined by " — ", with `` (split)`` added only when no
    part names the split already, wrapped to ``width`` characters a line (nothing clipped)."""
    import textwrap

    parts = [p.strip() for p in parts if p and p.strip()]
    text = " — ".join(parts)
    if split and split.lower() not in text.lower():
        text += f" ({split})"
    return "\n".join(textwrap.wrap(text, width=width, break_long_words=False)) or text


def confusion_figure(percent, labels: Sequence[str], *, title: Optional[str] = None, counts=None,
                     support: Optional[Sequence[int]] = None, warning: Optional[str] = None):
    """The matplotlib figure of :func:`plot_confusion` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pct = np.asarray(percent, dtype=float)
    k = len(labels)
    if support is None and counts is not None:
        support = np.asarray(counts).sum(axis=1).tolist()
    row_labels = [f"{c} (n={int(n)})" for c, n in zip(labels, support)] if support is not None else list(labels)
    n_lines = ((title or "").count("\n") + 1 if title else 0) + ((warning or "").count("\n") + 1 if warning else 0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * k, 0.9 + 0.55 * k + 0.22 * n_lines), dpi=110)
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), row_labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Reference (consensus), clips per row")
    for i in range(k):
        for j in range(k):
            txt = f"{pct[i, j]:.0f}"
            if counts is not None:
                txt += f"\n({int(np.asarray(counts)[i, j])})"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7 if counts is not None else 8,
                    color="white" if pct[i, j] > 55 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of reference class")
    if title:
        ax.set_title(title, fontsize=9)
    if warning:
        fig.suptitle(warning, fontsize=8, color="#b00020", fontweight="bold")
    legend = [f"{c} {CLASS_NAMES[c]}" for c in labels if c in CLASS_NAMES]
    if legend:  # what the letters stand for, under the matrix, four to a line
        lines = [" · ".join(legend[i:i + 4]) for i in range(0, len(legend), 4)]
        ax.annotate("\n".join(lines), xy=(0.5, 0), xycoords="axes fraction", xytext=(0, -38),
                    textcoords="offset points", ha="center", va="top", fontsize=7, color="#333333")
    fig.tight_layout()
    return fig


def plot_confusion(path, percent, labels: Sequence[str], *, title: Optional[str] = None,
                   counts=None, support: Optional[Sequence[int]] = None, warning: Optional[str] = None) -> Path:
    """Heat map of a confusion matrix in percent of each reference class, written as PNG.

    Each cell shows its percentage (and, with ``counts``, the number of clips below it).
    Each reference row is labelled with its number of clips (``support``, else the row
    sums of ``counts``): on a row of 5 clips one clip moves a cell by 20 points, which the
    reader has to see. Under the matrix, a legend says what each class letter stands for
    (A Angry, S Sad, …). ``warning`` (e.g. that the upstream has random weights) is printed
    in red above the matrix. The saved image is cropped to its contents, so no title is clipped.
    """
    import matplotlib.pyplot as plt

    fig = confusion_figure(percent, labels, title=title, counts=counts, support=support, warning=warning)
    try:
        with atomic_path(path, suffix=".png.tmp") as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.08)
    finally:
        plt.close(fig)
    return Path(path)


def write_split_metrics(out_dir, scores: Dict, *, title: Optional[str] = None) -> Dict[str, Path]:
    """Write ``per_class.csv``, ``confusion_percent.csv``, ``confusion_counts.csv`` and
    ``confusion.png`` of one split's :func:`~conilium.metrics.score` into ``out_dir``."""
    out_dir = Path(out_dir)
    labels = scores["confusion_labels"]
    files = {
        "per_class": out_dir / "per_class.csv",
        "confusion_percent": out_dir / "confusion_percent.csv",
        "confusion_counts": out_dir / "confusion_counts.csv",
        "confusion_png": out_dir / "confusion.png",
    }
    write_per_class_csv(files["per_class"], scores)
    write_confusion_csv(files["confusion_percent"], np.asarray(scores["confusion_percent"], dtype=float), labels)
    write_confusion_csv(files["confusion_counts"], np.asarray(scores["confusion"], dtype=np.int64), labels)
    plot_confusion(files["confusion_png"], scores["confusion_percent"], labels, title=title,
                   counts=scores["confusion"])
    return files
