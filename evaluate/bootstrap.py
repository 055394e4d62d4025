"""Bootstrap intervals of a run's scores and paired bootstrap comparisons of two runs.

Every score is resampled over the clips it scores: macro- and micro-F1 over the clips whose
reference is one of the eight classes (as :func:`conilium.metrics.score` keeps them), the
CCC of an attribute over the clips whose reference of that attribute is known (as
:func:`conilium.metrics.ccc_parts` keeps them). A draw picks that many clips with
replacement; the draws of one score are the rows of one index matrix
(:func:`bootstrap_indices`, seeded, made block by block so that memory stays bounded), and
the score of every draw is computed at once with numpy from per-draw class counts (F1) or
moments (CCC), with the same label handling as scikit-learn's ``f1_score(labels=CLASSES,
zero_division=0)``.

* **Interval**: the 95 % percentile interval, the 2.5th and 97.5th percentiles of the
  scores of the draws (numpy's linear interpolation).
* **Paired comparison** of runs A and B over the same clips: each draw resamples the
  clips once and scores both runs on them (the same indices), giving one difference
  B − A per draw. Its interval is the percentile interval of those differences; its
  two-sided p-value is the percentile-bootstrap one,
  ``p = min(1, 2 (1 + min(#{d ≤ 0}, #{d ≥ 0})) / (draws + 1))``: twice the smaller share of
  draws on either side of zero, with the add-one correction, so that p < 0.05 when (and
  about only when) the 95 % interval leaves zero out, and never 0 from a finite number of
  draws (the smallest p is 2 / (draws + 1)).

The observed scores are those of :mod:`conilium.metrics` (scikit-learn's), unchanged.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from conilium import CLASSES
from conilium.metrics import score, score_attributes
from conilium.runs import ATTRIBUTE_COLUMNS, Predictions, RunError, has_references, read_run

from .ensemble import align
from .options import DEFAULT_DRAWS, LEVEL
#: Index-matrix entries generated at once (rows × clips): bounds the memory of a large split.
_BLOCK = 1 << 21

#: How the numbers are computed, as written into the JSON outputs.
INTERVAL_METHOD = "percentile"
P_VALUE_METHOD = ("two-sided percentile bootstrap: min(1, 2 (1 + min(#{d <= 0}, #{d >= 0})) / (draws + 1)) "
                  "over the paired draws' differences d = B - A")


def _check_draws(draws: int) -> int:
    draws = int(draws)
    if draws < 1:
        raise ValueError(f"a bootstrap needs at least one draw, got {draws}")
    return draws


def index_blocks(n: int, draws: int, seed: int) -> Iterator[np.ndarray]:
    """The rows of :func:`bootstrap_indices`, a block of whole draws at a time."""
    draws = _check_draws(draws)
    if n < 1:
        raise ValueError("no clip to resample")
    rng = np.random.default_rng(seed)
    rows = max(1, min(draws, _BLOCK // n))
    done = 0
    while done < draws:
        r = min(rows, draws - done)
        yield rng.integers(0, n, size=(r, n))
        done += r


def bootstrap_indices(n: int, draws: int, seed: int) -> np.ndarray:
    """(draws, n) clip indices: draw ``d`` scores clips ``indices[d]`` (with replacement).

    The same ``(n, draws, seed)`` always gives the same matrix; every score of
    this module is computed on these draws.
    """
    return np.concatenate(list(index_blocks(n, draws, seed)))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap values."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def paired_p_value(differences: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p-value of paired differences (module docstring)."""
    d = np.asarray(differences, dtype=np.float64)
    side = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2 * (1 + side) / (len(d) + 1)))


# --------------------------------------------------------------------------- scores of the draws

def class_codes(letters: Sequence, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Each letter's index in ``classes`` (:data:`CLASSES` by default); ``len(classes)`` for
    anything else (a prediction outside the classes counts as a miss of its reference class,
    as in scikit-learn)."""
    pos = {c: i for i, c in enumerate(classes)}
    return np.array([pos.get(x, len(classes)) for x in letters], dtype=np.int64)


def _per_draw_counts(codes: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """(draws, k) counts of codes 0..k-1 among each draw's clips (code k is not counted)."""
    draws = idx.shape[0]
    flat = codes[idx] + (k + 1) * np.arange(draws)[:, None]
    return np.bincount(flat.ravel(), minlength=draws * (k + 1)).reshape(draws, k + 1)[:, :k]


def f1_draws(references: np.ndarray, predictions: np.ndarray, idx: np.ndarray,
             k: int = len(CLASSES)) -> Dict[str, np.ndarray]:
    """Macro- and micro-F1 of each draw (rows of ``idx``) from class codes (:func:`class_codes`;
    every reference a class). Per class ``F1 = 2 TP / (2 TP + FP + FN)``, 0 when the class is
    neither referenced nor predicted; macro: their mean over the ``k`` classes; micro: the
    same over the summed counts."""
    hits = np.where(references == predictions, references, k)
    tp = _per_draw_counts(hits, idx, k)
    denom = _per_draw_counts(references, idx, k) + _per_draw_counts(predictions, idx, k)
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)
    return {"f1_macro": f1.mean(axis=1), "f1_micro": 2.0 * tp.sum(axis=1) / denom.sum(axis=1)}


def ccc_draws(predictions: np.ndarray, references: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Lin's CCC of each draw with population moments, as :func:`conilium.metrics.ccc_parts`
    (1 when both sides are constant and equal, 0 when constant and unequal)."""
    shift = references.mean()  # one shift for both sides leaves the CCC as it is
    p, r = (predictions - shift)[idx], (references - shift)[idx]
    mp, mr = p.mean(axis=1), r.mean(axis=1)
    cov = ((p - mp[:, None]) * (r - mr[:, None])).mean(axis=1)
    denom = p.var(axis=1) + r.var(axis=1) + (mp - mr) ** 2
    return np.divide(2 * cov, denom, out=np.ones_like(cov), where=denom > 0)


# --------------------------------------------------------------------------- one split of aligned runs

def _class_part(runs: Sequence[Predictions]) -> Optional[Tuple[np.ndarray, List[np.ndarray]]]:
    """Reference codes of the scoreable clips and each run's prediction codes on them."""
    if not runs[0].classes:
        return None
    classes = tuple(runs[0].classes)
    refs = class_codes(runs[0].reference, classes)
    keep = refs < len(classes)
    if not keep.any():
        return None
    return refs[keep], [class_codes(p.prediction, classes)[keep] for p in runs]


def _attribute_parts(runs: Sequence[Predictions]) -> Dict[str, Tuple[np.ndarray, List[np.ndarray]]]:
    """Per attribute with a known reference: the references and each run's predictions on those clips."""
    if any(p.attributes is None for p in runs):
        return {}
    out = {}
    for k, name in enumerate(ATTRIBUTE_COLUMNS):
        ref = runs[0].attribute_refs[:, k]
        keep = ~np.isnan(ref)
        if keep.any():
            out[name] = (ref[keep], [p.attributes[keep, k] for p in runs])
    return out


def observed_scores(preds: Predictions) -> Dict[str, float]:
    """The scores :mod:`conilium.metrics` gives a split: ``f1_macro`` and ``f1_micro`` when a
    clip has a class reference, ``ccc_<attribute>`` for each attribute with a known reference."""
    out: Dict[str, float] = {}
    if preds.classes and has_references(preds):
        s = score(preds.reference, preds.prediction, preds.classes)
        out["f1_macro"], out["f1_micro"] = s["f1_macro"], s["f1_micro"]
    if preds.attributes is not None and not np.isnan(preds.attribute_refs).all():
        a = score_attributes(preds.attribute_refs, preds.attributes, ATTRIBUTE_COLUMNS)
        out.update({f"ccc_{name}": a[name]["ccc"] for name in ATTRIBUTE_COLUMNS if a[name]["ccc"] is not None})
    return out


def score_draws(runs: Sequence[Predictions], draws: int, seed: int) -> Dict[str, Tuple[int, np.ndarray]]:
    """Score → (clips resampled, (len(runs), draws) scores): every run scored on the same draws.

    ``runs`` are aligned predictions of one split (same clips, same order, same references).
    Each score has its own index matrix, ``bootstrap_indices(n, draws, seed)`` over its ``n``
    clips, so a score's draws do not depend on which other scores a run has.
    """
    out: Dict[str, Tuple[int, np.ndarray]] = {}
    part = _class_part(runs)
    if part is not None:
        refs, preds = part
        k = len(runs[0].classes)
        blocks = [[f1_draws(refs, p, idx, k) for p in preds] for idx in index_blocks(len(refs), draws, seed)]
        for key in ("f1_macro", "f1_micro"):
            out[key] = (len(refs), np.concatenate([[b[key] for b in run] for run in blocks], axis=1))
    for name, (ref, preds) in _attribute_parts(runs).items():
        blocks = [[ccc_draws(p, ref, idx) for p in preds] for idx in index_blocks(len(ref), draws, seed)]
        out[f"ccc_{name}"] = (len(ref), np.concatenate([np.stack(b) for b in blocks], axis=1))
    return out


def intervals(preds: Predictions, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
              level: float = LEVEL) -> Dict[str, Dict]:
    """Score → ``{"value", "low", "high", "n"}``: a split's observed scores (:func:`observed_scores`)
    and their percentile bootstrap intervals."""
    observed = observed_scores(preds)
    out = {}
    for key, (n, values) in score_draws([preds], draws, seed).items():
        if key in observed:
            low, high = percentile_interval(values[0], level)
            out[key] = {"value": observed[key], "low": low, "high": high, "n": n}
    return out


def paired(a: Predictions, b: Predictions, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
           level: float = LEVEL) -> Dict[str, Dict]:
    """Score → ``{"n", "a", "b", "difference", "low", "high", "p_value"}``: the paired bootstrap
    of B − A over the same draws of the same clips (``a`` and ``b`` aligned)."""
    obs_a, obs_b = observed_scores(a), observed_scores(b)
    out = {}
    for key, (n, values) in score_draws([a, b], draws, seed).items():
        if key not in obs_a or key not in obs_b:
            continue
        d = values[1] - values[0]
        low, high = percentile_interval(d, level)
        out[key] = {"n": n, "a": obs_a[key], "b": obs_b[key], "difference": obs_b[key] - obs_a[key],
                    "low": low, "high": high, "p_value": paired_p_value(d)}
    return out


# --------------------------------------------------------------------------- run directories

def _labelled(p: Predictions) -> bool:
    return has_references(p) or (p.attributes is not None and not np.isnan(p.attribute_refs).all())


def _what(p: Predictions) -> str:
    return " and ".join(x for x, has in (("class scores", bool(p.classes)), ("the attributes", p.attributes is not None))
                        if has)


def _common(a: Predictions, b: Predictions, run_a, run_b, split: str) -> Tuple[Predictions, Predictions, List[str]]:
    """``a`` and ``b`` reduced to what both predict (class scores, attributes), and a line for
    each kind of score only one of them has; a RunError when they have none in common."""
    classes = bool(a.classes) and bool(b.classes)
    attributes = a.attributes is not None and b.attributes is not None
    if not classes and not attributes:
        raise RunError(f"runs {run_a} and {run_b}, split {split}: no score in common (A predicts {_what(a)}, "
                       f"B {_what(b)})")
    left_out = []
    if not classes and (a.classes or b.classes):
        left_out.append(f"macro/micro-F1: only {'A' if a.classes else 'B'} predicts class scores")
    if not attributes and (a.attributes is not None or b.attributes is not None):
        left_out.append(f"CCC: only {'A' if a.attributes is not None else 'B'} predicts the attributes")

    def reduce(p: Predictions) -> Predictions:
        if classes:
            return Predictions(p.names, p.probs, p.prediction, p.reference, p.classes,
                               p.attributes if attributes else None, p.attribute_refs if attributes else None)
        return Predictions(p.names, np.zeros((len(p), 0)), [""] * len(p), [None] * len(p), (),
                           p.attributes, p.attribute_refs)

    return reduce(a), reduce(b), left_out


def _aligned_pair(run_a, run_b, a: Predictions, b: Predictions, split: str) -> Tuple[Predictions, Predictions]:
    """``b`` reordered like ``a`` (:func:`conilium.evaluate.ensemble.align`: the same clips, class
    columns and references, or a RunError naming how many clips differ and a few of them), its
    attributes too, which must have the same references."""
    key_a, key_b = f"{run_a} (A)", f"{run_b} (B)"
    aligned = align({key_a: a, key_b: b}, split)
    a2, b2 = aligned[key_a], aligned[key_b]
    if a.attributes is not None:
        row = {n: i for i, n in enumerate(b.names)}
        rows = np.array([row[n] for n in a.names], dtype=np.int64)
        b2.attributes, b2.attribute_refs = b.attributes[rows], b.attribute_refs[rows]
        differ = ~((a.attribute_refs == b2.attribute_refs) | (np.isnan(a.attribute_refs) & np.isnan(b2.attribute_refs)))
        bad = [a.names[i] for i in np.flatnonzero(differ.any(axis=1))]
        if bad:
            raise RunError(f"runs {run_a} and {run_b}, split {split}: attribute references differ for "
                           f"{len(bad)} clip(s), e.g. {bad[:3]}")
    return a2, b2


def compare_runs(run_a, run_b, *, splits: Optional[Sequence[str]] = None, draws: int = DEFAULT_DRAWS,
                 seed: int = 0, level: float = LEVEL) -> Dict:
    """The paired bootstrap of run B against run A on each split (:func:`paired`), over the
    scores both predict (a split's ``left_out`` names those only one of them has).

    ``splits`` defaults to every split both runs have with a reference (a class, or an attribute
    value); a split named must be in both. The runs must hold the same clips of each split
    (a RunError says how many are in one run only, and names a few).
    """
    data_a = read_run(run_a, splits, attributes_only_ok=True)
    data_b = read_run(run_b, splits, attributes_only_ok=True)
    wanted = list(splits) if splits else [s for s in data_a if s in data_b and _labelled(data_a[s])]
    if not wanted:
        raise RunError(f"runs {run_a} and {run_b}: no labelled split in both (splits of A: "
                       f"{', '.join(data_a) or 'none'}; of B: {', '.join(data_b) or 'none'})")
    result: Dict = {"a": str(run_a), "b": str(run_b), "draws": int(draws), "seed": int(seed), "level": level,
                    "interval": INTERVAL_METHOD, "p_value": P_VALUE_METHOD, "splits": {}}
    for split in wanted:
        a, b, left_out = _common(data_a[split], data_b[split], run_a, run_b, split)
        a, b = _aligned_pair(run_a, run_b, a, b, split)
        if not _labelled(a):
            raise RunError(f"runs {run_a} and {run_b}: split {split} has no labelled clip to score")
        result["splits"][split] = {"clips": len(a), "scores": paired(a, b, draws=draws, seed=seed, level=level),
                                   "left_out": left_out}
    result["skipped_splits"] = [] if splits else [s for s in {**data_a, **data_b} if s not in wanted]
    return result


def split_intervals(run_dir, split: str, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                    level: float = LEVEL) -> Dict:
    """The ``bootstrap`` entry of ``conilium-eval metrics``'s metrics.json for one split of a run:
    the method, draws, seed, level and each score's interval (:func:`intervals`)."""
    preds = read_run(run_dir, [split], attributes_only_ok=True)[split]
    return {"draws": int(draws), "seed": int(seed), "level": level, "interval": INTERVAL_METHOD,
            "scores": intervals(preds, draws=draws, seed=seed, level=level)}
