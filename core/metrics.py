"""Scores on the eight classes, computed with scikit-learn.

Only clips whose reference is one of the eight classes are scored (O, X and unknown
references are left out, as in the paper).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from . import CLASSES


def scoreable(references: Sequence) -> np.ndarray:
    """Boolean mask of references that are target classes."""
    return np.array([r in CLASSES for r in references], dtype=bool)


def score(references: Sequence[str], predictions: Sequence[str]) -> Dict:
    """Macro/micro F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix is given in counts (rows: reference, columns: prediction, both
    in :data:`CLASSES` order) and in percent of each reference class (the paper's Fig. 4).
    """
    refs = np.asarray(references, dtype=object)
    preds = np.asarray(predictions, dtype=object)
    keep = scoreable(refs)
    refs, preds = refs[keep].astype(str), preds[keep].astype(str)
    labels = list(CLASSES)
    if len(refs) == 0:
        raise ValueError("no scoreable clip (no reference among the eight classes)")
    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    cm = confusion_matrix(refs, preds, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(cm.sum(1, keepdims=True) > 0, 100.0 * cm / cm.sum(1, keepdims=True), 0.0)
    return {
        "n": int(len(refs)),
        "f1_macro": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
        "f1_micro": float(f1_score(refs, preds, labels=labels, average="micro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(labels)},
        "confusion_labels": labels,
        "confusion": cm.tolist(),
        "confusion_percent": np.round(pct, 2).tolist(),
    }


def macro_f1(references: Sequence[str], predictions: Sequence[str]) -> float:
    refs = np.asarray(references, dtype=object)
    keep = scoreable(refs)
    return float(f1_score(refs[keep].astype(str), np.asarray(predictions, dtype=object)[keep].astype(str),
                          labels=list(CLASSES), average="macro", zero_division=0))
