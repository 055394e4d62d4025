"""Run directories and their predictions CSV files.

A run directory holds::

    config.json               what produced the run (frozen dataclass as JSON)
    model.pt                  the best checkpoint (not for ensembles / tuned copies)
    metrics.json              scores of every labelled split, best epoch, history
    predictions/<Split>.csv   FileName, A,S,H,U,F,D,C,N (probabilities), Prediction, Reference

``Reference`` is the consensus letter (O and X included, so nothing is hidden); it is
empty where the split is unlabelled. Scoring keeps the eight target classes only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from conilium import CLASSES
from conilium.errors import ConiliumError
from conilium.util import atomic_path, read_json

PRED_DIR = "predictions"


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
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.json)")
    return read_json(p)
