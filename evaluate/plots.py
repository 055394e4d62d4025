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


def plot_confusion(path, percent, labels: Sequence[str], *, title: Optional[str] = None,
                   counts=None) -> Path:
    """Heat map of a confusion matrix in percent of each reference class, written as PNG.

    Each cell shows its percentage (and, with ``counts``, the number of clips below it).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pct = np.asarray(percent, dtype=float)
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k), dpi=110)
    try:
        im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
        ax.set_xticks(range(k), labels)
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Reference (consensus)")
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
        fig.tight_layout()
        with atomic_path(path, suffix=".png.tmp") as tmp:
            fig.savefig(tmp, format="png")
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
