"""Scores on the eight classes, computed with scikit-learn.

Only clips whose reference is one of the eight classes are scored (O, X and unknown
references are left out, as in the paper).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from . import CLASSES


def scoreable(references: Sequence, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Boolean mask of references that are target classes (of ``classes``)."""
    classes = tuple(classes)
    return np.array([r in classes for r in references], dtype=bool)


def score(references: Sequence[str], predictions: Sequence[str], classes: Sequence[str] = CLASSES) -> Dict:
    """Macro/micro F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix is given in counts (rows: reference, columns: prediction, both
    in ``classes`` order, MSP-Podcast's eight by default) and in percent of each reference
    class (the paper's Fig. 4).
    """
    refs = np.asarray(references, dtype=object)
    preds = np.asarray(predictions, dtype=object)
    labels = list(classes)
    keep = scoreable(refs, labels)
    refs, preds = refs[keep].astype(str), preds[keep].astype(str)
    if len(refs) == 0:
        raise ValueError(f"no scoreable clip (no reference among the classes {', '.join(labels)})")
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


def macro_f1(references: Sequence[str], predictions: Sequence[str], classes: Sequence[str] = CLASSES) -> float:
    refs = np.asarray(references, dtype=object)
    keep = scoreable(refs, classes)
    return float(f1_score(refs[keep].astype(str), np.asarray(predictions, dtype=object)[keep].astype(str),
                          labels=list(classes), average="macro", zero_division=0))


# --------------------------------------------------------------------------- attributes

def ccc_parts(predictions: Sequence[float], references: Sequence[float]) -> Dict:
    """Lin's concordance correlation coefficient and its parts, over the clips whose
    reference is known (NaN references are left out).

    ``ccc = 2 ρ σ_p σ_r / (σ_p² + σ_r² + (μ_p − μ_r)²)`` with population (1/N) moments;
    ``pearson`` is ρ (None when either side is constant); ``ccc`` is 0 when both sides are
    constant and unequal, 1 when they are constant and equal. None entries when no clip
    is left.
    """
    p = np.asarray(predictions, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    keep = ~np.isnan(r)
    p, r = p[keep], r[keep]
    n = int(len(r))
    if n == 0:
        return {"n": 0, "ccc": None, "pearson": None, "pred_mean": None, "pred_std": None,
                "ref_mean": None, "ref_std": None}
    mp, mr = float(p.mean()), float(r.mean())
    vp, vr = float(p.var()), float(r.var())
    cov = float(((p - mp) * (r - mr)).mean())
    denom = vp + vr + (mp - mr) ** 2
    ccc = 2 * cov / denom if denom > 0 else 1.0
    pearson = None
    if vp > 0 and vr > 0:
        pearson = float(np.corrcoef(p, r)[0, 1])
    return {"n": n, "ccc": float(ccc), "pearson": pearson, "pred_mean": mp, "pred_std": float(np.sqrt(vp)),
            "ref_mean": mr, "ref_std": float(np.sqrt(vr))}


def score_attributes(references: np.ndarray, predictions: np.ndarray,
                     names: Sequence[str] = ("EmoAct", "EmoVal", "EmoDom")) -> Dict:
    """Per attribute :func:`ccc_parts` of (N, 3) predictions against (N, 3) references
    (NaN where unknown), and ``ccc_mean`` over the attributes with a score."""
    refs = np.asarray(references, dtype=np.float64)
    preds = np.asarray(predictions, dtype=np.float64)
    if refs.shape != preds.shape or refs.ndim != 2 or refs.shape[1] != len(names):
        raise ValueError(f"attribute predictions {preds.shape} and references {refs.shape}: expected (N, {len(names)})")
    out: Dict = {name: ccc_parts(preds[:, k], refs[:, k]) for k, name in enumerate(names)}
    known = [out[name]["ccc"] for name in names if out[name]["ccc"] is not None]
    if not known:
        raise ValueError("no clip with a known attribute reference")
    out["ccc_mean"] = float(np.mean(known))
    out["n"] = int((~np.isnan(refs).all(axis=1)).sum())
    return out


def score_binary(references: Sequence[float], scores: Sequence[float], classes: Sequence[str], *,
                 threshold: float = 0.0) -> Dict:
    """An auxiliary two-class task (e.g. gender) over the clips whose reference is known
    (``references`` 0/1, NaN unknown; a score above ``threshold`` — a logit above 0, a
    probability above 0.5 — predicts ``classes[1]``): ``n``, ``accuracy``
    and ``uar`` (unweighted average recall: the mean of the two classes' recalls); None scores
    for no known clip."""
    refs = np.asarray(references, dtype=np.float64)
    known = ~np.isnan(refs)
    if not known.any():
        return {"n": 0, "accuracy": None, "uar": None, "classes": list(classes)}
    y = refs[known].astype(int)
    p = (np.asarray(scores, dtype=np.float64)[known] > threshold).astype(int)
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    return {"n": int(known.sum()), "accuracy": float(accuracy_score(y, p)),
            "uar": float(balanced_accuracy_score(y, p)), "classes": list(classes), "counts": counts}
