"""Run directories and their predictions CSV files.

A run directory holds::

    config.json               what produced the run (frozen dataclass as JSON)
    model.pt                  the best checkpoint (not for ensembles / tuned copies)
    metrics.json              scores of every labelled split, best epoch, history
    predictions/<Split>.csv   FileName, A,S,H,U,F,D,C,N (probabilities), Prediction, Reference

``Reference`` is the consensus letter (O and X included, so nothing is hidden); it is
empty where the split is unlabelled. Scoring keeps the eight target classes only.

A run that predicts the attributes (``train-head --task joint|attributes``) adds
``EmoAct,EmoVal,EmoDom`` (predictions, corpus scale) and ``Ref_EmoAct,Ref_EmoVal,Ref_EmoDom``
(references, empty where unknown) after ``Reference``; an attributes-only run's file
has ``FileName`` and those six columns only (no class columns, no Prediction or
Reference). Its metrics.json scores the attributes under ``attributes`` (split → CCC per
attribute and its parts, ``ccc_mean``). Readers that need class scores refuse an
attributes-only run by name (:func:`read_run`).

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
from .dirs import RunDir, RunError  # noqa: F401 (RunError re-exported)
from .metrics import score, score_attributes
from .util import atomic_path

#: Attribute columns of a predictions CSV: predictions, then references.
ATTRIBUTE_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")
ATTRIBUTE_REF_COLUMNS = tuple(f"Ref_{c}" for c in ATTRIBUTE_COLUMNS)

PRED_DIR = RunDir.PREDICTIONS
METRICS = RunDir.METRICS
CONFIG = RunDir.CONFIG


@dataclass
class Predictions:
    """One split's predictions: names, (N, C) probabilities, predicted and reference letters."""

    names: List[str]
    probs: np.ndarray
    prediction: List[str]
    reference: List[Optional[str]]
    classes: Sequence[str] = CLASSES
    #: (N, 3) predicted arousal, valence, dominance (corpus scale) and their references (NaN
    #: where unknown), for runs that predict them; None otherwise
    attributes: Optional[np.ndarray] = None
    attribute_refs: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def attributes_only(self) -> bool:
        """True for an attributes-only run's predictions (no class scores)."""
        return len(self.classes) == 0


def _value(x: float) -> str:
    return "" if np.isnan(x) else f"{x:.6f}"


def write_predictions(path, names: Sequence[str], probs: np.ndarray, prediction: Sequence[str],
                      reference: Sequence[Optional[str]], classes: Sequence[str] = CLASSES, *,
                      attributes: Optional[np.ndarray] = None, attribute_refs: Optional[np.ndarray] = None) -> None:
    """One split's predictions CSV. ``classes`` empty (with ``attributes``): an attributes-only
    file, FileName and the attribute columns."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(names), len(classes)):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(names)} clips and {len(classes)} classes")
    if attributes is None and not classes:
        raise ValueError("a predictions file needs class scores or attributes")
    header = ["FileName"]
    if classes:
        header += [*classes, "Prediction", "Reference"]
    if attributes is not None:
        attributes = np.asarray(attributes, dtype=np.float64).reshape(len(names), len(ATTRIBUTE_COLUMNS))
        refs = (np.full_like(attributes, np.nan) if attribute_refs is None
                else np.asarray(attribute_refs, dtype=np.float64).reshape(attributes.shape))
        header += [*ATTRIBUTE_COLUMNS, *ATTRIBUTE_REF_COLUMNS]
    with atomic_path(path, suffix=".csv.tmp") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, n in enumerate(names):
                row = [n]
                if classes:
                    row += [*(f"{p:.6f}" for p in probs[i]), prediction[i], reference[i] or ""]
                if attributes is not None:
                    row += [*(_value(v) for v in attributes[i]), *(_value(v) for v in refs[i])]
                w.writerow(row)


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
        attr_cols = [*ATTRIBUTE_COLUMNS, *ATTRIBUTE_REF_COLUMNS]
        has_attr = header[-len(attr_cols):] == attr_cols
        core = header[: len(header) - len(attr_cols)] if has_attr else header
        if core == ["FileName"] and has_attr:
            n_cls = 0
        elif len(core) >= 4 and core[0] == "FileName" and core[-2:] == ["Prediction", "Reference"]:
            n_cls = len(core) - 3
        else:
            raise RunError(f"{path}:1: expected header FileName,<class columns>,Prediction,Reference"
                           f"[,{','.join(attr_cols)}] or FileName,{','.join(attr_cols)}; got {header}")
        classes = core[1: 1 + n_cls]
        names, probs, pred, ref, attrs = [], [], [], [], []
        for lineno, row in enumerate(r, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise RunError(f"{path}:{lineno}: expected {len(header)} fields, found {len(row)}")
            try:
                probs.append([float(x) for x in row[1: 1 + n_cls]])
            except ValueError:
                raise RunError(f"{path}:{lineno}: non-numeric probability in {row[1: 1 + n_cls]}") from None
            if has_attr:
                values = row[len(core):]
                try:
                    attrs.append([float(x) if x != "" else np.nan for x in values])
                except ValueError:
                    raise RunError(f"{path}:{lineno}: non-numeric attribute value in {values}") from None
            names.append(row[0])
            if n_cls:
                pred.append(row[len(core) - 2])
                ref.append(row[len(core) - 1] or None)
            else:
                pred.append("")
                ref.append(None)
    a = np.asarray(attrs, dtype=np.float64).reshape(len(names), len(attr_cols)) if has_attr else None
    return Predictions(names, np.asarray(probs, dtype=np.float64).reshape(len(names), len(classes)),
                       pred, ref, tuple(classes), None if a is None else a[:, :3], None if a is None else a[:, 3:])


def prediction_path(run_dir, split: str) -> Path:
    return RunDir(run_dir).prediction_path(split)


def run_splits(run_dir) -> List[str]:
    return RunDir(run_dir).splits()


def load_run_config(run_dir) -> Dict:
    """The run's ``config.json`` (:meth:`conilium.dirs.RunDir.config`)."""
    return RunDir(run_dir).config()


# --------------------------------------------------------------------------- writing a run

def letters(probs: np.ndarray, classes: Sequence[str] = CLASSES) -> List[str]:
    """Predicted class letters (of ``classes``, in column order): argmax of the scores."""
    return [classes[i] for i in np.asarray(probs).argmax(axis=1)]


def write_run_outputs(out_dir, split_predictions: Mapping[str, Tuple[Sequence[str], np.ndarray, Sequence[Optional[str]]]],
                      history: Optional[List[dict]] = None, best_epoch: Optional[int] = None, *,
                      dev_split: str = "Development", extra: Optional[Mapping] = None,
                      classes: Sequence[str] = CLASSES) -> dict:
    """Write ``predictions/<Split>.csv`` for each split and then ``metrics.json``; return the metrics.

    ``split_predictions`` maps a split name to ``(names, probs (N, 8), references)``,
    references being consensus letters (O and X included) or None where unknown, or to
    ``(names, probs, references, attributes (N, 3), attribute references (N, 3))`` for a
    run that predicts the attributes (corpus scale, NaN where unknown; ``probs`` (N, 0):
    an attributes-only run). Prediction = argmax of the scores. Every split with at least
    one target-class reference is scored; ``metrics.json`` holds the ``dev_split`` scores
    at top level (f1_macro, f1_micro, per_class, confusion, …), ``split``, ``best_epoch``,
    ``history``, ``splits`` (split → scores), for attribute runs ``attributes`` (split →
    :func:`~conilium.metrics.score_attributes`, every split with a known attribute
    reference) and ``ccc_mean`` (the ``dev_split``'s), and the ``extra`` items. It is
    written last, so a run directory with a metrics.json is complete. ``classes``: the
    class codes of the probability columns (MSP-Podcast's eight by default).
    """
    classes = tuple(classes)
    out_dir = Path(out_dir)
    splits: Dict[str, dict] = {}
    attr_splits: Dict[str, dict] = {}
    with_attributes = False
    for split, entry in split_predictions.items():
        names, probs, refs = entry[:3]
        attributes, attr_refs = (entry[3], entry[4]) if len(entry) > 3 else (None, None)
        probs = np.asarray(probs, dtype=np.float64)
        n_cls = 0 if (attributes is not None and probs.size == 0) else len(classes)
        probs = probs.reshape(len(names), n_cls)
        pred = letters(probs, classes) if (len(names) and n_cls) else [""] * len(names)
        write_predictions(prediction_path(out_dir, split), list(names), probs, pred, list(refs),
                          classes if n_cls else (), attributes=attributes, attribute_refs=attr_refs)
        if n_cls and any(r in classes for r in refs):
            splits[split] = score(list(refs), pred, classes)
        if attributes is not None:
            with_attributes = True
            attr_refs = np.asarray(attr_refs, dtype=np.float64).reshape(len(names), len(ATTRIBUTE_COLUMNS))
            if len(names) and not np.isnan(attr_refs).all():
                attr_splits[split] = score_attributes(attr_refs, attributes, ATTRIBUTE_COLUMNS)
    main = dev_split if dev_split in splits else next(iter(splits), None)
    metrics: dict = dict(splits[main]) if main is not None else {}
    if with_attributes:
        attr_main = dev_split if dev_split in attr_splits else next(iter(attr_splits), None)
        main = main if main is not None else attr_main
        if attr_main is not None:
            metrics["ccc_mean"] = attr_splits[attr_main]["ccc_mean"]
            metrics["attributes_split"] = attr_main
    metrics["split"] = main
    metrics["best_epoch"] = best_epoch
    metrics["history"] = list(history or [])
    metrics["splits"] = splits
    if with_attributes:
        metrics["attributes"] = attr_splits
    if extra:
        metrics.update(extra)
    RunDir(out_dir).write_metrics(metrics)
    return metrics


def is_complete(run_dir) -> bool:
    return RunDir(run_dir).is_complete()


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


def read_run(run_dir, splits: Optional[Sequence[str]] = None, *,
             attributes_only_ok: bool = False) -> Dict[str, Predictions]:
    """Every split's predictions of a run (or the given splits), with clear errors.

    An attributes-only run (``train-head --task attributes``: no class scores) is a
    :class:`RunError` naming it unless ``attributes_only_ok``: the readers of class scores
    (thresholds, ensembles, Easy/Difficult, submissions) cannot use it.
    """
    available = check_run(run_dir)
    wanted = list(splits) if splits else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise RunError(f"{run_dir}: no predictions for split(s) {', '.join(missing)}; "
                       f"available: {', '.join(available)}")
    out = {s: read_predictions(prediction_path(run_dir, s)) for s in wanted}
    if not attributes_only_ok:
        for s, p in out.items():
            if p.attributes_only:
                raise RunError(f"{run_dir}: an attributes-only run (train-head --task attributes: "
                               f"{prediction_path(run_dir, s).name} holds EmoAct, EmoVal, EmoDom and no class "
                               f"scores); this needs a run with class scores (--task categories or joint)")
    return out
