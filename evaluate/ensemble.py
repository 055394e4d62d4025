"""Ensembles of runs (paper, section 3.6): mean probability or majority vote.

Both combine runs split by split over the same clips and the same class columns (a
mismatch is a :class:`~conilium.runs.RunError` naming the runs and the split).
The ensemble is written as a new run directory scored like any other run.

* ``mean``: the (optionally weighted) mean of the members' probabilities; the
  prediction is its argmax.
* ``vote``: each member votes for its own ``Prediction`` (with its weight); a tie is
  broken by the highest mean probability among the tied classes, then by class order.
  The probability columns written are the members' mean probabilities.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from conilium.dirs import RunDir

from conilium.metrics import score
from conilium.runs import (Predictions, RunError, check_run, derived_run_dir, has_references,
                           prediction_path, read_run, with_main_split, write_predictions)

from .options import METHODS


def _check_weights(weights: Optional[Sequence[float]], n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.shape != (n,):
        raise RunError(f"{len(w)} weights given for {n} runs")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise RunError(f"weights must be non-negative with a positive sum, got {list(w)}")
    return w


def align(members: Dict[str, Predictions], split: str) -> Dict[str, Predictions]:
    """Reorder every member's rows and columns like the first member's, or fail clearly.

    Members must hold the same clips (as a set, each once) and the same class columns
    (as a set), and agree on every clip's reference.
    """
    names = list(members)
    first = members[names[0]]
    classes = tuple(first.classes)
    if len(set(first.names)) != len(first.names):
        raise RunError(f"{names[0]}: split {split} lists a clip more than once")
    order = {n: i for i, n in enumerate(first.names)}
    out = OrderedDict([(names[0], first)])
    for run in names[1:]:
        p = members[run]
        if set(p.classes) != set(classes) or len(p.classes) != len(classes):
            raise RunError(f"runs {names[0]} and {run}, split {split}: different class columns "
                           f"({','.join(classes)} vs {','.join(p.classes)})")
        if len(set(p.names)) != len(p.names):
            raise RunError(f"{run}: split {split} lists a clip more than once")
        if set(p.names) != set(first.names):
            only_a = sorted(set(first.names) - set(p.names))
            only_b = sorted(set(p.names) - set(first.names))
            raise RunError(f"runs {names[0]} and {run}, split {split}: different clip sets "
                           f"({len(only_a)} clip(s) only in the first, e.g. {only_a[:3]}; "
                           f"{len(only_b)} only in the second, e.g. {only_b[:3]})")
        rows = np.array([0] * len(p.names))
        for i, n in enumerate(p.names):
            rows[order[n]] = i
        cols = [list(p.classes).index(c) for c in classes]
        ref = [p.reference[i] for i in rows]
        bad = [n for n, a, b in zip(first.names, first.reference, ref) if (a or None) != (b or None)]
        if bad:
            raise RunError(f"runs {names[0]} and {run}, split {split}: references differ for "
                           f"{len(bad)} clip(s), e.g. {bad[:3]}")
        out[run] = Predictions(list(first.names), p.probs[rows][:, cols], [p.prediction[i] for i in rows],
                               ref, classes)
    return out


def combine(members: Sequence[Predictions], *, method: str = "mean",
            weights: Optional[Sequence[float]] = None) -> Predictions:
    """Combine aligned predictions (same clips, same order, same classes) of one split."""
    if method not in METHODS:
        raise RunError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    if not members:
        raise RunError("no run to combine")
    w = _check_weights(weights, len(members))
    first = members[0]
    classes = tuple(first.classes)
    probs = sum(wi * m.probs for wi, m in zip(w, members)) / w.sum()
    if method == "mean":
        pred = [classes[i] for i in np.argmax(probs, axis=1)]
    else:
        pos = {c: i for i, c in enumerate(classes)}
        votes = np.zeros((len(first.names), len(classes)))
        for wi, m in zip(w, members):
            for i, letter in enumerate(m.prediction):
                if letter not in pos:
                    raise RunError(f"clip {m.names[i]}: prediction {letter!r} is not one of "
                                   f"{','.join(classes)}")
                votes[i, pos[letter]] += wi
        top = votes >= votes.max(axis=1, keepdims=True) - 1e-12
        # Among the tied classes, the highest mean probability wins (np.argmax: then class order).
        pred = [classes[i] for i in np.argmax(np.where(top, probs, -np.inf), axis=1)]
    return Predictions(list(first.names), probs, pred, list(first.reference), classes)


def ensemble_runs(run_dirs: Sequence, out_dir, *, method: str = "mean",
                  weights: Optional[Sequence[float]] = None, splits: Optional[Sequence[str]] = None,
                  overwrite: bool = False) -> Dict:
    """Combine runs into a new run directory; returns its metrics dict.

    ``splits`` defaults to every split all runs have (a split only some runs have is
    left out and listed in ``metrics.json`` under ``skipped_splits``); a split named
    explicitly must exist in every run.
    """
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise RunError("an ensemble needs at least two runs")
    if method not in METHODS:
        raise RunError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    if len({r.resolve() for r in run_dirs}) != len(run_dirs):
        raise RunError("the same run is listed twice (give it a higher weight instead)")
    w = _check_weights(weights, len(run_dirs))
    per_run = [check_run(r) for r in run_dirs]
    if splits:
        wanted = list(splits)
        skipped: List[str] = []
    else:
        wanted = [s for s in per_run[0] if all(s in p for p in per_run[1:])]
        skipped = sorted(set().union(*per_run) - set(wanted))
        if not wanted:
            raise RunError("the runs share no split: " + "; ".join(
                f"{r}: {', '.join(p)}" for r, p in zip(run_dirs, per_run)))
    data = {str(r): read_run(r, wanted) for r in run_dirs}
    metrics: Dict = {"kind": "ensemble", "method": method, "weights": w.tolist(), "splits": {},
                     "members": {str(r): {} for r in run_dirs}, "skipped_splits": skipped}
    with derived_run_dir(out_dir, overwrite=overwrite, sources=run_dirs) as tmp:
        for split in wanted:
            aligned = align({r: data[r][split] for r in data}, split)
            ens = combine(list(aligned.values()), method=method, weights=w)
            write_predictions(prediction_path(tmp, split), ens.names, ens.probs, ens.prediction, ens.reference,
                              ens.classes)
            if has_references(ens):
                metrics["splits"][split] = score(ens.reference, ens.prediction, ens.classes)
                for r, p in aligned.items():
                    s = score(p.reference, p.prediction, p.classes)
                    metrics["members"][r][split] = {"f1_macro": s["f1_macro"], "f1_micro": s["f1_micro"]}
        member_configs = [RunDir(r).config() for r in run_dirs]
        config = {"kind": "ensemble", "method": method, "weights": w.tolist(),
                  "members": [str(r.resolve()) for r in run_dirs], "splits": wanted,
                  "member_configs": member_configs}
        caches = {c.get("cache") for c in member_configs if isinstance(c, dict)}
        if len(caches) == 1 and None not in caches:
            config["cache"] = caches.pop()
        run = RunDir(tmp)
        run.write_config(config)
        run.write_metrics(with_main_split(metrics))
    return metrics


def prediction_disagreement(run_dirs: Sequence, split: str = "Development") -> Dict:
    """How often runs predict different classes on the scoreable clips of ``split`` (the
    seed's section 4: the three upstreams' predictions "differ more than 30% of the time").

    Returns ``clips``, ``not_unanimous`` (share of clips where not every run predicts the
    same class) and ``pairwise`` (``"a | b"`` → share of clips where the two differ, runs
    named by their directory names).
    """
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise RunError("prediction disagreement needs at least two runs")
    data = {str(r): read_run(r, [split])[split] for r in run_dirs}
    aligned = align(data, split)
    first = next(iter(aligned.values()))
    keep = np.array([r in tuple(first.classes) for r in first.reference], dtype=bool)
    if not keep.any():
        raise RunError(f"{run_dirs[0]}: split {split} has no scoreable clip")
    preds = np.array([np.asarray(p.prediction, dtype=object)[keep] for p in aligned.values()])
    unanimous = np.all(preds == preds[0], axis=0)
    names = [r.name for r in run_dirs]
    pairwise = {f"{names[i]} | {names[j]}": float(np.mean(preds[i] != preds[j]))
                for i in range(len(names)) for j in range(i + 1, len(names))}
    return {"split": split, "clips": int(keep.sum()), "runs": [str(r) for r in run_dirs],
            "not_unanimous": float(1.0 - unanimous.mean()), "pairwise": pairwise}
