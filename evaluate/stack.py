"""Stacking: a meta-classifier learned over the class probabilities of several runs.

The runs are aligned split by split as an ensemble's are (:func:`.ensemble.align`: same
clips, same class columns, same references). Each clip's features are the runs'
probabilities side by side (runs x classes columns); the meta-classifier is fitted on the
clips of the fit split (Development by default) whose reference is one of the classes,
as ``metrics`` scores them (O, X and unknown references are left out of the fit).

Two meta-classifiers:

* ``logistic`` (default): scikit-learn's multinomial ``LogisticRegression`` (L2, ``C=1``)
  on the concatenated probabilities.
* ``weights`` (``weights_only``): one non-negative weight per run, the stacked
  regression of Breiman (1996) and LeBlanc & Tibshirani (1996): a non-negative least-squares
  fit (``LinearRegression(positive=True)``, no intercept) of the one-hot reference on each
  run's probabilities, the weights then scaled to sum to one; the stacked probabilities are
  the weighted mean of the runs' (as ``ensemble --weights``).

``balanced`` weighs every clip of the fit by ``n / (classes x count of its class)``
(scikit-learn's ``class_weight="balanced"``), since macro-F1 is the target.

Honest score: the scoreable fit-split clips are cut into ``folds`` stratified folds
(:func:`.thresholds.stratified_folds`, seeded by ``seed``); each fold is predicted by a
meta-classifier fitted on the other folds only, and those out-of-fold predictions are what
the fit split's ``predictions/<Split>.csv`` holds and what its scores in ``metrics.json``
are (``metrics.json`` ``cross_fitting``: ``held_out`` lists each fold's rows of that file,
from 0). The in-sample score of the meta-classifier fitted on all scoreable clips is shown
beside it. That full model predicts every other split (and the fit split's unscoreable
clips, which no fit saw).

Soup (``soup`` N >= 2): instead of one fit, N fits on stratified bootstrap resamples of
the fitting clips (every class keeps its count; ``sklearn.utils.resample``), whose
coefficients and intercepts (or run weights) are averaged into one model. The folds'
models are soups of their own fitting clips the same way, so the out-of-fold score is that
of the soup.

A class missing from a fit's clips gets probability 0 from that model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from conilium.dirs import RunDir
from conilium.errors import ConfigError
from conilium.metrics import score
from conilium.runs import (Predictions, RunError, check_run, derived_run_dir, has_references,
                           prediction_path, read_run, with_main_split, write_predictions)

from .ensemble import align
from .thresholds import _reference_index, stratified_folds

#: Inverse regularisation strength of the logistic meta-classifier (scikit-learn's default).
C = 1.0
MAX_ITER = 1000


@dataclass
class MetaModel:
    """A fitted meta-classifier over ``n_runs`` runs of ``n_classes`` classes.

    ``logistic``: a scikit-learn LogisticRegression over the classes in ``present``
    (indices into the classes); ``weights``: one weight per run, summing to one.
    """

    kind: str
    n_runs: int
    n_classes: int
    present: np.ndarray
    logistic: Optional[object] = None
    weights: Optional[np.ndarray] = None

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, n_classes) stacked probabilities of features ``x`` (N, n_runs * n_classes)."""
        if self.kind == "weights":
            per_run = x.reshape(len(x), self.n_runs, self.n_classes)
            return np.einsum("nrc,r->nc", per_run, self.weights)
        out = np.zeros((len(x), self.n_classes))
        out[:, self.present] = self.logistic.predict_proba(x)
        return out

    def describe(self, classes: Sequence[str], features: Sequence[str], members: Sequence[str]) -> Dict:
        """The coefficients as JSON values."""
        if self.kind == "weights":
            return {"type": "weights", "weights": {m: float(w) for m, w in zip(members, self.weights)}}
        lr = self.logistic
        return {"type": "logistic", "C": C, "classes": [classes[i] for i in self.present],
                "features": list(features),
                "coef": [[float(v) for v in row] for row in lr.coef_],
                "intercept": [float(v) for v in lr.intercept_]}


def _sample_weight(y: np.ndarray, balanced: bool) -> Optional[np.ndarray]:
    if not balanced:
        return None
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight("balanced", y)


def _fit_once(x: np.ndarray, y: np.ndarray, n_runs: int, n_classes: int, weights_only: bool,
              balanced: bool) -> MetaModel:
    present = np.unique(y)
    if weights_only:
        from sklearn.linear_model import LinearRegression

        onehot = np.zeros((len(y), n_classes))
        onehot[np.arange(len(y)), y] = 1.0
        design = x.reshape(len(x), n_runs, n_classes).transpose(0, 2, 1).reshape(-1, n_runs)
        sw = _sample_weight(y, balanced)
        reg = LinearRegression(fit_intercept=False, positive=True)
        reg.fit(design, onehot.reshape(-1), sample_weight=None if sw is None else np.repeat(sw, n_classes))
        w = np.clip(reg.coef_, 0.0, None)
        # Every run's probabilities useless for the reference: no evidence for any weighting.
        w = w / w.sum() if w.sum() > 0 else np.full(n_runs, 1.0 / n_runs)
        return MetaModel("weights", n_runs, n_classes, present, weights=w)
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=C, max_iter=MAX_ITER, class_weight="balanced" if balanced else None)
    lr.fit(x, y)
    return MetaModel("logistic", n_runs, n_classes, present, logistic=lr)


def fit_meta(x: np.ndarray, y: np.ndarray, *, n_runs: int, n_classes: int, weights_only: bool = False,
             balanced: bool = False, soup: int = 0, seed=0) -> MetaModel:
    """The meta-classifier fitted on features ``x`` and class indices ``y``; with ``soup`` >= 2,
    the average of that many fits on stratified bootstrap resamples (seeded by ``seed``)."""
    if len(np.unique(y)) < 2:
        raise ConfigError(f"stacking needs clips of at least two classes to fit on; found only "
                          f"{len(y)} clip(s) of one class")
    if soup < 2:
        return _fit_once(x, y, n_runs, n_classes, weights_only, balanced)
    from sklearn.utils import resample

    rng = np.random.RandomState(seed)
    fits = []
    for _ in range(soup):
        xs, ys = resample(x, y, replace=True, stratify=y, random_state=rng.randint(2 ** 31 - 1))
        fits.append(_fit_once(xs, ys, n_runs, n_classes, weights_only, balanced))
    first = fits[0]
    if weights_only:
        w = np.mean([f.weights for f in fits], axis=0)
        return MetaModel("weights", n_runs, n_classes, first.present, weights=w / w.sum())
    lr = copy.deepcopy(first.logistic)
    lr.coef_ = np.mean([f.logistic.coef_ for f in fits], axis=0)
    lr.intercept_ = np.mean([f.logistic.intercept_ for f in fits], axis=0)
    return MetaModel("logistic", n_runs, n_classes, first.present, logistic=lr)


def _check_folds(y: np.ndarray, folds: int, split: str) -> None:
    if folds < 2:
        raise ConfigError(f"the out-of-fold estimate needs at least 2 folds, got {folds}")
    largest = int(np.bincount(y).max()) if len(y) else 0
    if largest < folds:
        raise ConfigError(f"split {split}: {folds} stratified folds need a class with at least {folds} scoreable "
                          f"clips; the largest has {largest}: give --folds {max(largest, 2)} or fewer"
                          if largest >= 2 else
                          f"split {split}: every class has at most one scoreable clip ({len(y)} in all), too "
                          f"few for {folds} stratified folds")


def cross_fit(x: np.ndarray, references: Sequence[Optional[str]], classes: Sequence[str], *, n_runs: int,
              folds: int = 5, seed: int = 0, weights_only: bool = False, balanced: bool = False,
              soup: int = 0, split: str = "Development") -> Dict:
    """Out-of-fold stacked probabilities of the scoreable clips and the full model.

    Returns ``probs`` (N, classes): each scoreable clip's row from the model fitted without
    its fold, every other clip's from ``model`` (fitted on all scoreable clips);
    ``in_sample`` (N, classes) from ``model``; ``folds`` (per fold the held-out indices);
    ``model``.
    """
    classes = tuple(classes)
    ref = _reference_index(references, classes)
    idx = np.flatnonzero(ref >= 0)
    if not len(idx):
        raise RunError(f"split {split}: no clip whose reference is one of {','.join(classes)} to fit on")
    kw = dict(n_runs=n_runs, n_classes=len(classes), weights_only=weights_only, balanced=balanced, soup=soup)
    _check_folds(ref[idx], folds, split)
    model = fit_meta(x[idx], ref[idx], seed=[seed, 0], **kw)
    in_sample = model.predict_proba(x)
    probs = in_sample.copy()
    out_folds = []
    for i, held in enumerate(stratified_folds(references, folds, seed, classes)):
        train = np.setdiff1d(idx, held, assume_unique=True)
        fold_model = fit_meta(x[train], ref[train], seed=[seed, i + 1], **kw)
        probs[held] = fold_model.predict_proba(x[held])
        out_folds.append(held)
    return {"probs": probs, "in_sample": in_sample, "folds": out_folds, "model": model, "scoreable": idx}


def _letters(probs: np.ndarray, classes: Sequence[str]) -> List[str]:
    return [classes[i] for i in np.argmax(probs, axis=1)]


def _feature_names(run_dirs: Sequence[Path], classes: Sequence[str]) -> List[str]:
    names = [r.name for r in run_dirs]
    if len(set(names)) != len(names):
        names = [str(r) for r in run_dirs]
    return [f"{n}:{c}" for n in names for c in classes]


def stack_runs(run_dirs: Sequence, out_dir, *, fit_split: str = "Development", folds: int = 5, seed: int = 0,
               weights_only: bool = False, balanced: bool = False, soup: int = 0,
               splits: Optional[Sequence[str]] = None, overwrite: bool = False) -> Dict:
    """Stack runs into a new run directory; returns its metrics dict.

    ``splits`` defaults to every split all runs have (a split only some runs have is left
    out and listed under ``skipped_splits``); the fit split and a split named in ``splits``
    must be in every run.
    """
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise RunError(f"stacking needs at least two runs, got {len(run_dirs)}")
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise RunError("the same run is listed twice")
    if soup == 1 or soup < 0:
        raise ConfigError(f"a soup averages at least 2 fits (or 0: a single fit), got {soup}")
    per_run = [check_run(r) for r in run_dirs]
    for r, available in zip(run_dirs, per_run):
        for s in [fit_split, *(splits or ())]:
            if s not in available:
                raise RunError(f"{r}: no predictions for split {s}; available: {', '.join(available)}")
    if splits:
        wanted = list(dict.fromkeys([fit_split, *splits]))
        skipped: List[str] = []
    else:
        wanted = [s for s in per_run[0] if all(s in p for p in per_run[1:])]
        skipped = sorted(set().union(*per_run) - set(wanted))
    data = {str(r): read_run(r, wanted) for r in run_dirs}
    aligned = {s: align({r: data[r][s] for r in data}, s) for s in wanted}
    first = next(iter(aligned[fit_split].values()))
    classes = tuple(first.classes)
    for s in wanted:  # every split in the same class order as the fit split
        if tuple(next(iter(aligned[s].values())).classes) != classes:
            raise RunError(f"{run_dirs[0]}: split {s} has class columns "
                           f"{','.join(next(iter(aligned[s].values())).classes)}, split {fit_split} "
                           f"{','.join(classes)}")
    n_runs = len(run_dirs)

    def features(split: str) -> np.ndarray:
        return np.hstack([p.probs for p in aligned[split].values()])

    if not has_references(first):
        raise RunError(f"{prediction_path(run_dirs[0], fit_split)}: no labelled clip to fit the stacking on")
    fit = cross_fit(features(fit_split), first.reference, classes, n_runs=n_runs, folds=folds, seed=seed,
                    weights_only=weights_only, balanced=balanced, soup=soup, split=fit_split)
    model: MetaModel = fit["model"]
    members = [str(r.resolve()) for r in run_dirs]
    coefficients = model.describe(classes, _feature_names(run_dirs, classes), members)
    oof = score(first.reference, _letters(fit["probs"], classes), classes)
    in_sample = score(first.reference, _letters(fit["in_sample"], classes), classes)
    fold_scores = [score([first.reference[j] for j in held], _letters(fit["probs"][held], classes), classes)["f1_macro"]
                   for held in fit["folds"]]
    cross_fitting = {"folds": int(folds), "seed": int(seed), "split": fit_split, "n": int(len(fit["scoreable"])),
                     "f1_macro_out_of_fold": oof["f1_macro"], "f1_micro_out_of_fold": oof["f1_micro"],
                     "f1_macro_in_sample": in_sample["f1_macro"], "f1_micro_in_sample": in_sample["f1_micro"],
                     "f1_macro_folds": fold_scores,
                     "held_out": [[int(j) for j in held] for held in fit["folds"]]}
    options = {"meta": model.kind, "fit_split": fit_split, "folds": int(folds), "seed": int(seed),
               "weights_only": bool(weights_only), "balanced": bool(balanced), "soup": int(soup)}
    metrics: Dict = {"kind": "stack", **options, "splits": {}, "in_sample": {fit_split: in_sample},
                     "cross_fitting": cross_fitting, "model": coefficients,
                     "members": {str(r): {} for r in run_dirs}, "skipped_splits": skipped}
    with derived_run_dir(out_dir, overwrite=overwrite, sources=run_dirs) as tmp:
        for split in wanted:
            rows = aligned[split]
            ref_run = next(iter(rows.values()))
            probs = fit["probs"] if split == fit_split else model.predict_proba(features(split))
            stacked = Predictions(list(ref_run.names), probs, _letters(probs, classes), list(ref_run.reference),
                                  classes)
            write_predictions(prediction_path(tmp, split), stacked.names, stacked.probs, stacked.prediction,
                              stacked.reference, classes)
            if has_references(stacked):
                metrics["splits"][split] = score(stacked.reference, stacked.prediction, classes)
                for r, p in rows.items():
                    s = score(p.reference, p.prediction, p.classes)
                    metrics["members"][r][split] = {"f1_macro": s["f1_macro"], "f1_micro": s["f1_micro"]}
        config = {"kind": "stack", **options, "members": members, "splits": wanted, "model": coefficients,
                  "f1_macro_out_of_fold": oof["f1_macro"], "f1_macro_in_sample": in_sample["f1_macro"],
                  "member_configs": [RunDir(r).config() for r in run_dirs]}
        run = RunDir(tmp)
        run.write_config(config)
        run.write_metrics(with_main_split(metrics, fit_split))
    return metrics
