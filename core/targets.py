"""Training targets built from all annotators (the paper's section 3.3 and Figure 2).

* ``hard``: one-hot consensus label.
* ``P``: for each class, the share of annotators whose primary emotion is that class.
* ``S``: each annotator contributes the set primary ∪ secondaries; the target is each
  class's share of all contributed labels.
* ``P*`` / ``S*``: the clips whose largest P (S) share reaches a threshold
  (0.6 / 0.5 by default); a filter of the training clips only.

Other, ``Other-…`` and non-target words are ignored, so P and S sum to 1 over the eight
classes. A clip none of whose annotations names a target class has no P (S) target.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import CLASSES
from .corpus import Annotation, Clip
from .errors import ConfigError

TARGET_KINDS = ("hard", "P", "S", "P*", "S*")
DEFAULT_THRESHOLDS = {"P*": 0.6, "S*": 0.5}
_INDEX = {c: i for i, c in enumerate(CLASSES)}


def hard_target(emo_class: Optional[str]) -> Optional[np.ndarray]:
    """One-hot vector of a consensus letter, None for O, X or unknown."""
    if emo_class not in _INDEX:
        return None
    y = np.zeros(len(CLASSES), dtype=np.float32)
    y[_INDEX[emo_class]] = 1.0
    return y


def primary_target(annotations: Sequence[Annotation]) -> Optional[np.ndarray]:
    """P: share of annotators whose primary is each class (Other primaries ignored)."""
    counts = np.zeros(len(CLASSES), dtype=np.float64)
    for a in annotations:
        c = a.primary_class
        if c is not None:
            counts[_INDEX[c]] += 1
    total = counts.sum()
    return (counts / total).astype(np.float32) if total > 0 else None


def secondary_target(annotations: Sequence[Annotation]) -> Optional[np.ndarray]:
    """S: share of all perceived labels (primary ∪ secondaries per annotator) of each class."""
    counts = np.zeros(len(CLASSES), dtype=np.float64)
    for a in annotations:
        for c in a.perceived_classes:
            counts[_INDEX[c]] += 1
    total = counts.sum()
    return (counts / total).astype(np.float32) if total > 0 else None


def base_kind(kind: str) -> str:
    """``P*`` → ``P``, ``S*`` → ``S``; others unchanged."""
    if kind not in TARGET_KINDS:
        raise ConfigError(f"unknown target kind {kind!r}; expected one of {', '.join(TARGET_KINDS)}")
    return kind.rstrip("*")


def clip_target(clip: Clip, kind: str) -> Optional[np.ndarray]:
    """The target vector of one clip for ``kind`` (``P*``/``S*`` give the P/S vector)."""
    b = base_kind(kind)
    if b == "hard":
        return hard_target(clip.emo_class)
    if b == "P":
        return primary_target(clip.annotations)
    return secondary_target(clip.annotations)


def agreement(clip: Clip, kind: str) -> Optional[float]:
    """Largest share of the clip's P (for P, P*) or S (for S, S*) target, None without annotations."""
    b = base_kind(kind)
    if b == "hard":
        raise ConfigError("agreement is defined on P or S targets, not on hard labels")
    y = clip_target(clip, b)
    return None if y is None else float(y.max())


def passes_agreement(clip: Clip, kind: str, thresholds: Optional[Dict[str, float]] = None) -> bool:
    """True when ``kind`` is not P*/S*, or when the clip's top share reaches the threshold."""
    if kind not in ("P*", "S*"):
        return True
    th = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))[kind]
    a = agreement(clip, kind)
    # a small tolerance so that exactly 3/5 passes a 0.6 threshold despite float rounding
    return a is not None and a >= th - 1e-6


def training_set(clips: Iterable[Clip], kind: str, *, thresholds: Optional[Dict[str, float]] = None,
                 fallback_to_hard: bool = True) -> Tuple[List[Clip], np.ndarray, Dict[str, int]]:
    """Training clips and their target matrix for ``kind``.

    Clips whose consensus is O, X or unknown are left out (the paper's rule). For soft
    targets, a scoreable clip without any target-class annotation falls back to its
    one-hot consensus when ``fallback_to_hard`` (else it is left out); P*/S* keep only
    clips whose top share reaches the threshold. Returns (clips, targets (N, 8), counts)
    where counts says how many clips were dropped or fell back, and why.
    """
    b = base_kind(kind)
    kept: List[Clip] = []
    ys: List[np.ndarray] = []
    counts = {"non_target_consensus": 0, "no_annotations": 0, "fallback_to_hard": 0, "low_agreement": 0}
    for clip in clips:
        if not clip.scoreable:
            counts["non_target_consensus"] += 1
            continue
        y = clip_target(clip, kind)
        if y is None:
            if b != "hard" and fallback_to_hard and kind not in ("P*", "S*"):
                y = hard_target(clip.emo_class)
                counts["fallback_to_hard"] += 1
            else:
                counts["no_annotations"] += 1
                continue
        if not passes_agreement(clip, kind, thresholds):
            counts["low_agreement"] += 1
            continue
        kept.append(clip)
        ys.append(y)
    targets = np.stack(ys).astype(np.float32) if ys else np.zeros((0, len(CLASSES)), np.float32)
    return kept, targets, counts


def class_counts(labels: Iterable[Optional[str]]) -> np.ndarray:
    n = np.zeros(len(CLASSES), dtype=np.int64)
    for c in labels:
        if c in _INDEX:
            n[_INDEX[c]] += 1
    return n


def class_weights(labels: Iterable[Optional[str]]) -> np.ndarray:
    """w_c = N / (C · n_c) from consensus letters (classes never seen count as seen once)."""
    n = class_counts(labels)
    total = n.sum()
    if total == 0:
        raise ConfigError("no training clip with a target-class consensus label: cannot compute class weights")
    return (total / (len(CLASSES) * np.maximum(n, 1))).astype(np.float32)


def class_index(letter: str) -> int:
    return _INDEX[letter]
