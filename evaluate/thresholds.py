"""Decision-threshold adjustment for macro-F1 (paper, section 3.7).

A classifier's probabilities are turned into a letter by ``argmax(probs + offsets)``:
one additive offset per class shifts the decision boundary towards (positive offset)
or away from (negative) that class. :func:`fit_offsets` chooses the offsets that
maximise macro-F1 on a labelled set by coordinate ascent over a fixed grid, starting
from zero offsets and accepting only strict improvements, so the tuned macro-F1 is
never below the untuned one on the set it was tuned on.

Tuning on the development set and scoring on the same set is optimistic (the paper
saw 0.361 on development, 0.335 on test). :func:`cross_validated_f1` gives an honest
estimate: the scoreable development clips are split into K stratified folds; offsets
are fitted on K-1 folds and each clip is scored only by offsets that never saw it.

:func:`tune_run` applies this to a run directory: offsets are chosen on one split
(Development by default) and applied unchanged to every split of the run, written as
a new run directory (probabilities unchanged, ``Prediction`` re-decided).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold

from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.dirs import RunDir
from conilium.util import write_json

from conilium.metrics import score
from conilium.runs import (RunError, derived_run_dir, has_references, prediction_path,
                           read_run, with_main_split, write_predictions)

from .options import DEFAULT_ROUNDS

#: Offsets tried for each class: -0.5 to 0.5 in steps of 0.01.
DEFAULT_GRID = tuple(float(x) for x in np.round(np.linspace(-0.5, 0.5, 101), 4))
THRESHOLDS_FILE = RunDir.THRESHOLDS


# --------------------------------------------------------------------------- core math

def _reference_index(references: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Index of each reference in ``classes``, -1 where it is not a class (O, X, unknown)."""
    pos = {c: i for i, c in enumerate(classes)}
    return np.array([pos.get(r, -1) if isinstance(r, str) else -1 for r in references], dtype=np.int64)


def _macro_f1_idx(ref: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over ``n_classes`` labels from index arrays (same as scikit-learn's with
    ``labels=classes, zero_division=0``: a class never referenced nor predicted scores 0)."""
    cm = np.bincount(ref * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return float(f1.mean())


def _check_probs(probs, n_refs: Optional[int], classes: Sequence[str]) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probabilities of shape {probs.shape}; expected (N, {len(classes)}) for classes "
                         f"{','.join(classes)}")
    if n_refs is not None and probs.shape[0] != n_refs:
        raise ValueError(f"{probs.shape[0]} rows of probabilities but {n_refs} references")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contain NaN or inf")
    return probs


def fit_offsets(probs: np.ndarray, references: Sequence[Optional[str]], classes: Sequence[str] = CLASSES, *,
                grid: Sequence[float] = DEFAULT_GRID, rounds: int = DEFAULT_ROUNDS) -> np.ndarray:
    """Per-class additive offsets maximising macro-F1 of ``argmax(probs + offsets)``.

    Only clips whose reference is one of ``classes`` count (O, X and unknown references
    are ignored). Coordinate ascent: in each of at most ``rounds`` rounds, every class's
    offset in turn is set to the grid value giving the best macro-F1 with the other
    offsets fixed. Grid values are tried from the smallest magnitude up and a value is
    taken only when it strictly improves macro-F1, so the result is deterministic, as
    small as the data allow, and never scores below zero offsets.

    Macro-F1 is piecewise constant, so a single ascent from zero offsets can stop at
    once when no one class's offset alone helps. A second ascent starts from offsets
    that centre every class's mean score (``mean(probs) − mean(probs[:, c])``, the usual
    prior correction); its result is kept only when it scores strictly higher.
    """
    classes = tuple(classes)
    probs = _check_probs(probs, len(references), classes)
    ref = _reference_index(references, classes)
    keep = ref >= 0
    if not keep.any():
        raise ValueError("no scoreable clip to fit offsets on (no reference among the classes)")
    p, ref = probs[keep], ref[keep]
    # Smallest magnitude first; for equal magnitude the negative value first.
    order = sorted({float(g) for g in grid} | {0.0}, key=lambda g: (abs(g), g))
    offsets, best = _ascend(p, ref, np.zeros(len(classes)), order, rounds)
    centred = np.round(p.mean() - p.mean(axis=0), 6)
    alt, alt_best = _ascend(p, ref, centred, order, rounds)
    return alt if alt_best > best + 1e-12 else offsets


def _ascend(p: np.ndarray, ref: np.ndarray, start: np.ndarray, order: Sequence[float], rounds: int):
    """Coordinate ascent of macro-F1 from ``start``; returns (offsets, macro-F1)."""
    k = p.shape[1]
    offsets = np.array(start, dtype=np.float64)
    best = _macro_f1_idx(ref, np.argmax(p + offsets, axis=1), k)
    for _ in range(max(int(rounds), 0)):
        changed = False
        for c in range(k):
            shifted = p + offsets
            base_c = p[:, c]
            best_g = offsets[c]
            for g in order:
                if g == offsets[c]:
                    continue
                shifted[:, c] = base_c + g
                f = _macro_f1_idx(ref, np.argmax(shifted, axis=1), k)
                if f > best + 1e-12:
                    best, best_g, changed = f, g, True
            offsets[c] = best_g
        if not changed:
            break
    return offsets, best


def apply_offsets(probs: np.ndarray, offsets: Sequence[float], classes: Sequence[str] = CLASSES) -> List[str]:
    """Predicted letters ``classes[argmax(probs + offsets)]`` (ties go to the earlier class)."""
    classes = tuple(classes)
    probs = _check_probs(probs, None, classes)
    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.shape != (len(classes),):
        raise ValueError(f"{offsets.shape[0] if offsets.ndim else 0} offsets for {len(classes)} classes")
    return [classes[i] for i in np.argmax(probs + offsets, axis=1)]


def stratified_folds(references: Sequence[Optional[str]], k: int = 5, seed: int = 0,
                     classes: Sequence[str] = CLASSES) -> List[np.ndarray]:
    """K stratified folds over the scoreable clips: a list of index arrays (into ``references``).

    Every scoreable clip is in exactly one fold; unscoreable clips are in none.
    """
    ref = _reference_index(references, classes)
    idx = np.flatnonzero(ref >= 0)
    if k < 2:
        raise ConfigError(f"cross-validation needs k >= 2 folds, got {k}")
    if len(idx) < k:
        raise ConfigError(f"cross-validation with k={k} folds needs at least {k} scoreable clips, "
                          f"found {len(idx)}")
    largest = int(np.bincount(ref[idx]).max())
    if largest < k:
        raise ConfigError(f"cross-validation with k={k} stratified folds needs a class with at least {k} "
                          f"scoreable clips; the largest has {largest}: use -k {max(largest, 2)} or fewer, "
                          f"or -k 0 to skip the estimate" if largest >= 2 else
                          f"cross-validation needs a class with at least 2 scoreable clips; every class has "
                          f"one: use -k 0 to skip the estimate")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare classes with fewer members than folds are allowed: they land in fewer folds.
        warnings.simplefilter("ignore", UserWarning)
        return [idx[test] for _, test in skf.split(np.zeros(len(idx)), ref[idx])]


def cross_validated_f1(probs: np.ndarray, references: Sequence[Optional[str]], k: int = 5, seed: int = 0, *,
                       classes: Sequence[str] = CLASSES, grid: Sequence[float] = DEFAULT_GRID,
                       rounds: int = DEFAULT_ROUNDS) -> Dict:
    """Honest estimate of threshold tuning: fit on K-1 folds, score the held-out fold only.

    Returns ``k``, ``seed``, ``n`` (scoreable clips), ``f1_macro_untuned`` (zero offsets on
    all scoreable clips), ``f1_macro_pooled`` (macro-F1 over all clips, each predicted by
    the offsets of the fold that held it out), ``f1_macro_untuned_folds_mean`` and
    ``f1_macro_folds_mean`` / ``_sd``, and ``folds``: per fold the ``held_out`` indices
    (into the given arrays), the ``offsets`` fitted without them, and the held-out
    macro-F1 before and after tuning.
    """
    classes = tuple(classes)
    probs = _check_probs(probs, len(references), classes)
    ref = _reference_index(references, classes)
    folds = stratified_folds(references, k, seed, classes)
    scoreable_idx = np.flatnonzero(ref >= 0)
    pooled = np.full(len(ref), -1, dtype=np.int64)
    out_folds = []
    refs_list = list(references)
    for i, held in enumerate(folds):
        train = np.setdiff1d(scoreable_idx, held, assume_unique=True)
        offsets = fit_offsets(probs[train], [refs_list[j] for j in train], classes, grid=grid, rounds=rounds)
        pred = np.argmax(probs[held] + offsets, axis=1)
        pooled[held] = pred
        out_folds.append({
            "fold": i,
            "n_fit": int(len(train)),
            "n_held_out": int(len(held)),
            "held_out": [int(j) for j in held],
            "offsets": [float(o) for o in offsets],
            "f1_macro_untuned": _macro_f1_idx(ref[held], np.argmax(probs[held], axis=1), len(classes)),
            "f1_macro_tuned": _macro_f1_idx(ref[held], pred, len(classes)),
        })
    tuned = np.array([f["f1_macro_tuned"] for f in out_folds])
    return {
        "k": int(k),
        "seed": int(seed),
        "n": int(len(scoreable_idx)),
        "classes": list(classes),
        "f1_macro_untuned": _macro_f1_idx(ref[scoreable_idx], np.argmax(probs[scoreable_idx], axis=1),
                                          len(classes)),
        "f1_macro_pooled": _macro_f1_idx(ref[scoreable_idx], pooled[scoreable_idx], len(classes)),
        "f1_macro_folds_mean": float(tuned.mean()),
        "f1_macro_folds_sd": float(tuned.std(ddof=1)) if len(tuned) > 1 else 0.0,
        "f1_macro_untuned_folds_mean": float(np.mean([f["f1_macro_untuned"] for f in out_folds])),
        "folds": out_folds,
    }


def tune_run(run_dir, out_dir, *, tune_split: str = "Development", k: int = 5, seed: int = 0,
             grid: Sequence[float] = DEFAULT_GRID, rounds: int = DEFAULT_ROUNDS,
             overwrite: bool = False) -> Dict:
    """Fit offsets on ``tune_split`` of a run, apply them to every split, write a new run.

    The new run directory holds ``config.json`` (source run, its config, offsets and
    tuning settings), ``thresholds.json`` (offsets and before/after scores), the
    ``predictions/<Split>.csv`` of every split (probabilities as in the source run,
    ``Prediction`` from the tuned decision) and ``metrics.json`` (every labelled split's
    score, untuned and tuned, and the K-fold estimate; ``k < 2`` skips it).
    Returns the metrics dict.
    """
    run_dir = Path(run_dir)
    runs = read_run(run_dir)
    if tune_split not in runs:
        raise RunError(f"{run_dir}: no predictions for tuning split {tune_split}; "
                       f"available: {', '.join(runs)}")
    dev = runs[tune_split]
    classes = tuple(dev.classes)
    for split, p in runs.items():
        if tuple(p.classes) != classes:
            raise RunError(f"{prediction_path(run_dir, split)}: class columns {','.join(p.classes)} differ from "
                           f"{tune_split}'s {','.join(classes)}")
    if not has_references(dev):
        raise RunError(f"{prediction_path(run_dir, tune_split)}: no labelled clip to tune thresholds on")
    offsets = fit_offsets(dev.probs, dev.reference, classes, grid=grid, rounds=rounds)
    cv = cross_validated_f1(dev.probs, dev.reference, k, seed, classes=classes, grid=grid,
                            rounds=rounds) if k and k >= 2 else None
    source_config = RunDir(run_dir).config()
    offsets_by_class = {c: float(o) for c, o in zip(classes, offsets)}
    metrics: Dict = {"kind": "thresholds", "tune_split": tune_split, "offsets": offsets_by_class,
                     "splits": {}, "untuned": {}, "cross_validation": cv}
    with derived_run_dir(out_dir, overwrite=overwrite, sources=[run_dir]) as tmp:
        for split, p in runs.items():
            tuned = apply_offsets(p.probs, offsets, classes)
            write_predictions(prediction_path(tmp, split), p.names, p.probs, tuned, p.reference, classes)
            if has_references(p):
                metrics["untuned"][split] = score(p.reference, p.prediction, p.classes)
                metrics["splits"][split] = score(p.reference, tuned, classes)
        before = metrics["untuned"][tune_split]["f1_macro"]
        after = metrics["splits"][tune_split]["f1_macro"]
        config = {
            "kind": "thresholds",
            "source_run": str(run_dir.resolve()),
            "tune_split": tune_split,
            "offsets": offsets_by_class,
            "grid": [min(grid), max(grid), len(grid)],
            "rounds": int(rounds),
            "k": int(k or 0),
            "seed": int(seed),
            "source_config": source_config,
        }
        if isinstance(source_config, dict) and "cache" in source_config:
            config["cache"] = source_config["cache"]
        run = RunDir(tmp)
        run.write_config(config)
        write_json(run.thresholds_path, {
            "classes": list(classes), "offsets": offsets_by_class, "tune_split": tune_split,
            "f1_macro_before": before, "f1_macro_after": after,
            "f1_macro_cross_validated": cv["f1_macro_pooled"] if cv else None,
        })
        run.write_metrics(with_main_split(metrics, tune_split))
    return metrics
