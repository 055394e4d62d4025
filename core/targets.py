"""Training targets built from all annotators (the paper's section 3.3 and Figure 2).

* ``hard``: one-hot consensus label.
* ``P``: for each class, the share of annotators whose primary emotion is that class.
* ``S``: each annotator contributes the set primary ∪ secondaries; the target is each
  class's share of all contributed labels.
* ``P*`` / ``S*``: the clips where one class reaches a share threshold (0.6 / 0.5 by
  default); a filter of the training clips only. Two readings of that share
  (:data:`AGREEMENT_READINGS`):

  - ``"all"`` (the default, as the paper writes it: "the same primary labels agreed upon
    by at least 60 % of annotators", "at least 50 % of the labels list are the same"):
    the top target class's count over **all** annotators' primaries (P*), or over all
    perceived labels of all annotators (S*), Other and non-target words included;
  - ``"targets"``: the largest entry of the P (S) target vector itself, i.e. the share
    over target-class labels only (Other primaries and words left out of the count).

  Example: primaries N, N, Other, Other, S: ``"all"`` gives 2/5 = 0.4 (not P*),
  ``"targets"`` 2/3 ≈ 0.67 (P*).

Other, ``Other-…`` and non-target words are ignored by the targets themselves, so P and
S sum to 1 over the eight classes. A clip none of whose annotations names a target class
has no P (S) target.

**X and O clips** (no agreement, other) are left out of training by default, as in the
paper. With ``include_xo`` (``train-head --train-on-xo``) and soft targets, they train on
their annotators' target-class labels (their P or S vector, the P*/S* filter applied as
to any clip); an X or O clip whose annotations name no target class stays out. They are
never scored.

**Attributes** (arousal ``EmoAct``, valence ``EmoVal``, dominance ``EmoDom``, on the
MSP-Podcast 1–7 scale): a clip's attribute target is its consensus values, each missing
one replaced by the mean of its annotators' values; a clip with an attribute known
neither way has no attribute target. Heads train on the fixed rescale ``(v − 1) / 6``
to [0, 1] (:func:`to_unit`) and report on the corpus scale (:func:`from_unit`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import CLASSES, NON_TARGET_CONSENSUS
from .classes import MSP_PODCAST, ClassSet
from .corpus import Annotation, Clip
from .errors import ConfigError

TARGET_KINDS = ("hard", "P", "S", "P*", "S*")
DEFAULT_THRESHOLDS = {"P*": 0.6, "S*": 0.5}
#: Readings of the P*/S* agreement share (see the module docstring); the first is the default.
AGREEMENT_READINGS = ("all", "targets")
DEFAULT_READING = AGREEMENT_READINGS[0]
#: Key of a ``thresholds`` mapping that carries the reading (``TrainConfig.thresholds``).
READING_KEY = "over"
_INDEX = {c: i for i, c in enumerate(CLASSES)}


def _index(classes: Optional[ClassSet]) -> Dict[str, int]:
    return _INDEX if classes is None or classes.codes == CLASSES else {c: i for i, c in enumerate(classes.codes)}


def _of(annotations: Sequence[Annotation], classes: Optional[ClassSet]) -> ClassSet:
    return classes or (annotations[0].class_set if annotations else MSP_PODCAST)


def hard_target(emo_class: Optional[str], classes: Optional[ClassSet] = None) -> Optional[np.ndarray]:
    """One-hot vector of a consensus letter (of ``classes``, MSP-Podcast's eight by default),
    None for O, X or unknown."""
    index = _index(classes)
    if emo_class not in index:
        return None
    y = np.zeros(len(index), dtype=np.float32)
    y[index[emo_class]] = 1.0
    return y


def primary_target(annotations: Sequence[Annotation], classes: Optional[ClassSet] = None) -> Optional[np.ndarray]:
    """P: share of annotators whose primary is each class (Other primaries ignored)."""
    index = _index(_of(annotations, classes))
    counts = np.zeros(len(index), dtype=np.float64)
    for a in annotations:
        c = a.primary_class
        if c is not None:
            counts[index[c]] += 1
    total = counts.sum()
    return (counts / total).astype(np.float32) if total > 0 else None


def secondary_target(annotations: Sequence[Annotation], classes: Optional[ClassSet] = None) -> Optional[np.ndarray]:
    """S: share of all perceived labels (primary ∪ secondaries per annotator) of each class."""
    index = _index(_of(annotations, classes))
    counts = np.zeros(len(index), dtype=np.float64)
    for a in annotations:
        for c in a.perceived_classes:
            counts[index[c]] += 1
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
        return hard_target(clip.emo_class, clip.class_set)
    if b == "P":
        return primary_target(clip.annotations, clip.class_set)
    return secondary_target(clip.annotations, clip.class_set)


def check_reading(reading: str) -> str:
    if reading not in AGREEMENT_READINGS:
        raise ConfigError(f"unknown P*/S* agreement reading {reading!r}; expected one of "
                          f"{', '.join(AGREEMENT_READINGS)} (all: share of all annotators' labels, as the "
                          f"paper writes it; targets: share of target-class labels only)")
    return reading


def _label_counts(annotations: Sequence[Annotation], b: str) -> Tuple[np.ndarray, int]:
    """Counts of each target class and the count of every label, Other and non-target
    words included: primaries (``b == "P"``) or each annotator's perceived set, primary ∪
    secondaries, with all of an annotator's non-target words counted once as Other (``"S"``)."""
    index = _index(_of(annotations, None))
    counts = np.zeros(len(index), dtype=np.float64)
    total = 0
    for a in annotations:
        if b == "P":
            c = a.primary_class
            total += 1
            if c is not None:
                counts[index[c]] += 1
            continue
        perceived = a.perceived_classes
        for c in perceived:
            counts[index[c]] += 1
        total += len(perceived) + (1 if a.ignored_words() else 0)
    return counts, total


def agreement(clip: Clip, kind: str, reading: str = DEFAULT_READING) -> Optional[float]:
    """The clip's agreement share for P (P*) or S (S*); None without a target-class annotation.

    ``reading="all"``: the top target class's count over all annotators' labels (Other
    and non-target words count in the denominator); ``"targets"``: the largest entry of
    the P (S) target vector.
    """
    b = base_kind(kind)
    if b == "hard":
        raise ConfigError("agreement is defined on P or S targets, not on hard labels")
    check_reading(reading)
    if reading == "targets":
        y = clip_target(clip, b)
        return None if y is None else float(y.max())
    counts, total = _label_counts(clip.annotations, b)
    if counts.sum() == 0 or total == 0:
        return None
    return float(counts.max() / total)


def passes_agreement(clip: Clip, kind: str, thresholds: Optional[Dict] = None,
                     reading: Optional[str] = None) -> bool:
    """True when ``kind`` is not P*/S*, or when the clip's agreement share reaches the threshold.

    ``thresholds`` maps ``"P*"``/``"S*"`` to thresholds and may carry the reading under
    ``"over"`` (as ``TrainConfig.thresholds`` does); ``reading`` overrides it.
    """
    if kind not in ("P*", "S*"):
        return True
    merged = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
    th = merged[kind]
    a = agreement(clip, kind, reading or merged.get(READING_KEY, DEFAULT_READING))
    # a small tolerance so that exactly 3/5 passes a 0.6 threshold despite float rounding
    return a is not None and a >= th - 1e-6


def training_set(clips: Iterable[Clip], kind: str, *, thresholds: Optional[Dict] = None, fallback_to_hard: bool = True,
                 reading: Optional[str] = None, include_xo: bool = False,
                 classes: Optional[ClassSet] = None) -> Tuple[List[Clip], np.ndarray, Dict[str, int]]:
    """Training clips and their target matrix for ``kind``.

    Clips whose consensus is O, X or unknown are left out (the paper's rule). For soft
    targets, a scoreable clip without any target-class annotation falls back to its
    one-hot consensus when ``fallback_to_hard`` (else it is left out); P*/S* keep only
    clips whose agreement share (in ``reading``, else ``thresholds["over"]``, else
    :data:`DEFAULT_READING`) reaches the threshold. Returns (clips, targets (N, 8), counts)
    where counts says how many clips were dropped or fell back, and why.

    ``include_xo`` (soft targets only): clips whose consensus is X or O train too, on
    their P or S vector (P*/S*: when their agreement reaches the threshold); counts then
    also holds ``added_X`` and ``added_O`` (kept) and ``xo_no_target_label`` (left out: no
    annotation names a target class). Their letters stay X or O, so they count in no
    class weight (:func:`class_weights` counts target-class letters only).
    """
    b = base_kind(kind)
    if include_xo and b == "hard":
        raise ConfigError("training on X and O clips (--train-on-xo) needs soft targets (--labels P, S, P* or S*): "
                          "X and O clips have no one-hot consensus target")
    if kind in ("P*", "S*"):
        check_reading(reading or (thresholds or {}).get(READING_KEY, DEFAULT_READING))
    kept: List[Clip] = []
    ys: List[np.ndarray] = []
    counts = {"non_target_consensus": 0, "no_annotations": 0, "fallback_to_hard": 0, "low_agreement": 0}
    if include_xo:
        counts.update({"added_X": 0, "added_O": 0, "xo_no_target_label": 0})
    for clip in clips:
        if include_xo and clip.emo_class in NON_TARGET_CONSENSUS:
            y = clip_target(clip, kind)
            if y is None:
                counts["xo_no_target_label"] += 1
                continue
            if not passes_agreement(clip, kind, thresholds, reading):
                counts["low_agreement"] += 1
                continue
            counts[f"added_{clip.emo_class}"] += 1
            kept.append(clip)
            ys.append(y)
            continue
        if not clip.scoreable:
            counts["non_target_consensus"] += 1
            continue
        y = clip_target(clip, kind)
        if y is None:
            if b != "hard" and fallback_to_hard and kind not in ("P*", "S*"):
                y = hard_target(clip.emo_class, clip.class_set)
                counts["fallback_to_hard"] += 1
            else:
                counts["no_annotations"] += 1
                continue
        if not passes_agreement(clip, kind, thresholds, reading):
            counts["low_agreement"] += 1
            continue
        kept.append(clip)
        ys.append(y)
    width = len(classes) if classes is not None else (len(kept[0].class_set) if kept else len(CLASSES))
    targets = np.stack(ys).astype(np.float32) if ys else np.zeros((0, width), np.float32)
    return kept, targets, counts


#: Attribute names of :class:`~conilium.corpus.Clip` and their predictions CSV columns.
ATTRIBUTES = ("act", "val", "dom")
ATTRIBUTE_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")
#: The corpus scale of the attributes (MSP-Podcast: 1 to 7).
ATTRIBUTE_RANGE = (1.0, 7.0)


def to_unit(values):
    """Corpus scale → [0, 1]: ``(v − 1) / 6``."""
    lo, hi = ATTRIBUTE_RANGE
    return (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)


def from_unit(values):
    """[0, 1] → corpus scale: ``1 + 6 u`` (numpy arrays or torch tensors)."""
    lo, hi = ATTRIBUTE_RANGE
    return values * (hi - lo) + lo


def attribute_values(clip: Clip) -> np.ndarray:
    """(3,) arousal, valence, dominance on the corpus scale: the consensus value, else the
    mean of the annotators' values, else NaN."""
    out = np.full(len(ATTRIBUTES), np.nan, dtype=np.float64)
    for k, name in enumerate(ATTRIBUTES):
        v = getattr(clip, name)
        if v is None:
            given = [getattr(a, name) for a in clip.annotations if getattr(a, name) is not None]
            v = float(np.mean(given)) if given else None
        if v is not None:
            out[k] = float(v)
    return out


def attribute_target(clip: Clip) -> Optional[np.ndarray]:
    """The clip's attribute values on the corpus scale (:func:`attribute_values`), or None
    when any of the three is unknown."""
    v = attribute_values(clip)
    return None if np.isnan(v).any() else v


def attribute_set(clips: Iterable[Clip]) -> Tuple[List[Clip], np.ndarray, Dict[str, int]]:
    """Clips with an attribute target (whatever their consensus class, X and O included),
    their (N, 3) values on the corpus scale, and how many were left out for lacking one."""
    kept: List[Clip] = []
    ys: List[np.ndarray] = []
    counts = {"no_attributes": 0}
    for clip in clips:
        y = attribute_target(clip)
        if y is None:
            counts["no_attributes"] += 1
            continue
        kept.append(clip)
        ys.append(y)
    values = np.stack(ys) if ys else np.zeros((0, len(ATTRIBUTES)), np.float64)
    return kept, values, counts


#: The auxiliary gender task's two classes: target 1 for the second, 0 for the first; any other
#: gender ("Unknown") has no target and counts in no loss.
GENDER_CLASSES = ("Male", "Female")


def gender_targets(clips: Iterable[Clip]) -> np.ndarray:
    """Each clip's gender target: 1.0 Female, 0.0 Male, NaN where it is not known."""
    return np.array([float(GENDER_CLASSES.index(c.gender)) if c.gender in GENDER_CLASSES else np.nan
                     for c in clips], dtype=np.float32)


def class_counts(labels: Iterable[Optional[str]], classes: Optional[ClassSet] = None) -> np.ndarray:
    index = _index(classes)
    n = np.zeros(len(index), dtype=np.int64)
    for c in labels:
        if c in index:
            n[index[c]] += 1
    return n


def class_weights(labels: Iterable[Optional[str]], classes: Optional[ClassSet] = None) -> np.ndarray:
    """w_c = N / (C · n_c) from consensus letters (classes never seen count as seen once)."""
    n = class_counts(labels, classes)
    total = n.sum()
    if total == 0:
        raise ConfigError("no training clip with a target-class consensus label: cannot compute class weights")
    return (total / (len(n) * np.maximum(n, 1))).astype(np.float32)
