"""The report's figures: the corpus figures copied beside it, and each scored row's confusion
matrix (with its clip counts, and a warning on runs of a random-weight upstream)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

from conilium.util import atomic_path

from . import paper
from .plots import figure_title, plot_confusion

#: describe-corpus's figures, shown first and in this order.
CORPUS_FIGURES = ("durations.png", "cooccurrence.png")


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.replace("*", "star")).strip("-").lower()
    return s or "row"


def copy_corpus_figures(corpus_dir: Optional[Path], fig_dir: Path) -> List[Path]:
    """describe-corpus's figures copied to ``fig_dir/corpus`` (known ones first); their new paths."""
    if corpus_dir is None:
        return []
    names = [n for n in CORPUS_FIGURES if (corpus_dir / n).is_file()]
    names += sorted(p.name for p in corpus_dir.glob("*.png") if p.name not in names)
    copied = []
    for n in names:
        dst = fig_dir / "corpus" / n
        with atomic_path(dst, suffix=".png.tmp") as tmp:
            shutil.copyfile(corpus_dir / n, tmp)
        copied.append(dst)
    return copied


def plot_rows(scored: Dict[str, List[Dict]], out_dir: Path, fig_dir: Path) -> None:
    """A confusion matrix per scored row, in ``fig_dir/<table>/``; each row gets its
    ``"figure"`` (relative to ``out_dir``)."""
    for key, rows in scored.items():
        for r in rows:
            if not r.get("score"):
                continue
            name = _slug(r["label"])
            if not name.endswith(_slug(r["split"])):
                name += f"-{_slug(r['split'])}"
            png = fig_dir / key / f"{name}.png"
            s = r["score"]
            setting = r.get("setting") or {}
            warn = (f"RANDOM-WEIGHT UPSTREAM ({setting['random_init']}): a pipeline check, not a trained model"
                    if setting.get("random_init") else None)
            plot_confusion(png, s["confusion_percent"], s["confusion_labels"],
                           title=figure_title(paper.TABLES[key].title.split(":")[0], r["label"], split=r["split"]),
                           support=[sum(row) for row in s["confusion"]], warning=warn)
            r["figure"] = str(png.relative_to(out_dir))
