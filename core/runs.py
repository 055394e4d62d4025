"""Run directories and their predictions CSV files.

A run directory holds::

    config.json               what produced the run (frozen dataclass as JSON)
    model.pt                  the best checkpoint (not for ensembles / tuned copies)
    metrics.json              scores of every labelled split, best epoch, history
    predictions/<Split>.csv   FileName, A,S,H,U,F,D,C,N (probabilities), Prediction, Reference

``Reference`` is the consensus letter (O and X included, so nothing is hidden); it is
empty where the split is unlabelled. Scoring keeps the eight target classes only.

This is the contract between the stages that produce runs (:mod:`conilium.heads`,
:mod:`conilium.finetune`) and the one that reads them (:mod:`conilium.evaluate`):
writing a run, reading its predictions, checking it, and staging derived runs
(tuned, ensembled) so that nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import csv
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import CLASSES
from .errors import ConiliumError
from .metrics import score
from .util import atomic_path, read_json, write_json

PRED_DIR = "predictions"
METRICS = "metrics.json"
CONFIG = "config.json"


class RunError(ConiliumError):
    """A run directory or predictions file is missing or malformed."""


@dataclass
class Predictions:
    """One split's predictions: names, (N, C) probabilities, predicted and reference letters."""

    names: List[str]
    probs: np.ndarray
    prediction: List[str]
    reference: List[Optional[str]]
    classes: Sequence[str] = CLASSES

    def __len__(self) -> int:
        return len(self.names)


def write_predictions(path, names: Sequence[str], probs: np.ndarray, prediction: Sequence[str],
                      reference: Sequence[Optional[str]], classes: Sequence[str] = CLASSES) -> None:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(names), len(classes)):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(names)} clips and {len(classes)} classes")
    with atomic_path(path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["FileName", *classes, "Prediction", "Reference"])
            for i, n in enumerate(names):
                w.writerow([n, *(f"{p:.6f}" for p in probs[i]), prediction[i], reference[i] or ""])


def read_predictions(path) -> Predictions:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: predictions file not found")
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        try:
            header = next(r)
        except StopIteration:
            raise RunError(f"{path}: empty predictions file") from None
        if len(header) < 4 or header[0] != "FileName" or header[-2:] != ["Prediction", "Reference"]:
            raise RunError(f"{path}:1: expected header FileName,<class columns>,Prediction,Reference; got {header}")
        classes = header[1:-2]
        names, probs, pred, ref = [], [], [], []
        for lineno, row in enumerate(r, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise RunError(f"{path}:{lineno}: expected {len(header)} fields, found {len(row)}")
            try:
                probs.append([float(x) for x in row[1:-2]])
            except ValueError:
                raise RunError(f"{path}:{lineno}: non-numeric probability in {row[1:-2]}") from None
            names.append(row[0])
            pred.append(row[-2])
            ref.append(row[-1] or None)
    return Predictions(names, np.asarray(probs, dtype=np.float64).reshape(len(names), len(classes)),
                       pred, ref, tuple(classes))


def prediction_path(run_dir, split: str) -> Path:
    return Path(run_dir) / PRED_DIR / f"{split}.csv"


def run_splits(run_dir) -> List[str]:
    d = Path(run_dir) / PRED_DIR
    return sorted(p.stem for p in d.glob("*.csv")) if d.is_dir() else []


def load_run_config(run_dir) -> Dict:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    try:
        config = read_json(p)
    except ValueError as e:
        raise RunError(f"{p}: damaged run configuration ({e}); rerun the command that wrote {run_dir}") from None
    if not isinstance(config, dict):
        raise RunError(f"{p}: damaged run configuration (not a JSON object)")
    return config


# --------------------------------------------------------------------------- writing a run

def letters(probs: np.ndarray) -> List[str]:
    """Predicted class letters: argmax of the scores."""
    return [CLASSES[i] for i in np.asarray(probs).argmax(axis=1)]


def write_run_outputs(out_dir, split_predictions: Mapping[str, Tuple[Sequence[str], np.ndarray, Sequence[Optional[str]]]],
                      history: Optional[List[dict]] = None, best_epoch: Optional[int] = None, *,
                      dev_split: str = "Development", extra: Optional[Mapping] = None) -> dict:
    """Write ``predictions/<Split>.csv`` for each split and then ``metrics.json``; return the metrics.

    ``split_predictions`` maps a split name to ``(names, probs (N, 8), references)``,
    references being consensus letters (O and X included) or None where unknown.
    Prediction = argmax of the scores. Every split with at least one target-class
    reference is scored; ``metrics.json`` holds the ``dev_split`` scores at top level
    (f1_macro, f1_micro, per_class, confusion, …), ``split``, ``best_epoch``, ``history``,
    ``splits`` (split → scores) and the ``extra`` items. It is written last, so a run
    directory with a metrics.json is complete.
    """
    out_dir = Path(out_dir)
    splits: Dict[str, dict] = {}
    for split, (names, probs, refs) in split_predictions.items():
        probs = np.asarray(probs, dtype=np.float64)
        pred = letters(probs) if len(names) else []
        write_predictions(prediction_path(out_dir, split), list(names), probs.reshape(len(names), len(CLASSES)),
                          pred, list(refs))
        if any(r in CLASSES for r in refs):
            splits[split] = score(list(refs), pred)
    main = dev_split if dev_split in splits else next(iter(splits), None)
    metrics: dict = dict(splits[main]) if main is not None else {}
    metrics["split"] = main
    metrics["best_epoch"] = best_epoch
    metrics["history"] = list(history or [])
    metrics["splits"] = splits
    if extra:
        metrics.update(extra)
    write_json(out_dir / METRICS, metrics)
    return metrics


def is_complete(run_dir) -> bool:
    return (Path(run_dir) / METRICS).is_file()


# --------------------------------------------------------------------------- derived run directories

def _fresh_dir(beside: Path, suffix: str) -> Path:
    """A new hidden directory next to ``beside`` (created with the usual umask permissions)."""
    while True:
        d = beside.parent / f".{beside.name}.{secrets.token_hex(4)}{suffix}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue


@contextlib.contextmanager
def derived_run_dir(out_dir, *, overwrite: bool = False, sources: Sequence = ()) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out_dir`` only if the block succeeds.

    ``out_dir`` must not exist (or ``overwrite``); it may not be one of ``sources`` (the
    runs it is derived from) nor contain one. On failure nothing is left behind.
    """
    out_dir = Path(out_dir)
    for s in sources:
        s = Path(s).resolve()
        o = out_dir.resolve()
        if o == s or o in s.parents:
            raise RunError(f"{out_dir}: output directory would overwrite the source run {s}")
    if out_dir.exists() and not overwrite:
        raise RunError(f"{out_dir}: already exists (choose another output directory, or overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_dir(out_dir, ".tmp")
    try:
        yield staging
        if out_dir.exists():
            trash = _fresh_dir(out_dir, ".old")
            os.replace(out_dir, trash / "old")
            os.replace(staging, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def has_references(preds: Predictions) -> bool:
    """True when at least one clip's reference is one of the run's classes."""
    return any(r in preds.classes for r in preds.reference if r)


def score_predictions(preds: Predictions) -> Optional[Dict]:
    """:func:`~conilium.evaluate.metrics.score` of a split, or None when it has no labelled clip."""
    if not has_references(preds):
        return None
    return score(preds.reference, preds.prediction)


def with_main_split(metrics: Dict, main: str = "Development") -> Dict:
    """``metrics`` with the ``main`` split's scores (or the first scored split's) copied to the
    top level and ``split`` naming it, as train-head's metrics.json has them."""
    splits = metrics.get("splits") or {}
    name = main if main in splits else next(iter(splits), None)
    out = dict(splits[name]) if name is not None else {}
    out["split"] = name
    out.update(metrics)
    return out


def check_run(run_dir) -> List[str]:
    """The splits of a run directory; a RunError when it is missing, has no config.json or
    no predictions."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    load_run_config(run_dir)
    available = run_splits(run_dir)
    if not available:
        raise RunError(f"{run_dir}: no predictions (expected {run_dir}/predictions/<Split>.csv)")
    return available


def read_run(run_dir, splits: Optional[Sequence[str]] = None) -> Dict[str, Predictions]:
    """Every split's predictions of a run (or the given splits), with clear errors."""
    available = check_run(run_dir)
    wanted = list(splits) if splits else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise RunError(f"{run_dir}: no predictions for split(s) {', '.join(missing)}; "
                       f"available: {', '.join(available)}")
    return {s: read_predictions(prediction_path(run_dir, s)) for s in wanted}
