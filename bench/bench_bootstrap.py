"""What the bootstrap costs: 95 % intervals of one run (conilium-eval metrics) and the paired
bootstrap of two runs (conilium-eval compare) over synthetic predictions.

    python bench/bench_bootstrap.py [--clips 1000] [--draws 2000] [--repeats 5] [--loop-draws 100]

The clips get references spread over the eight classes and predictions that are right about
half of the time; the attribute figure times the three CCCs of a run that predicts them.
Prints the min and median seconds over ``--repeats``, and for scale the per-draw cost of a
plain loop calling scikit-learn's f1_score on each draw (``--loop-draws`` of them,
extrapolated to ``--draws``). Set OPENBLAS_NUM_THREADS=1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _predictions(clips: int, seed: int, attributes: bool):
    from conilium import CLASSES
    from conilium.runs import Predictions

    rng = np.random.default_rng(seed)
    refs = rng.choice(list(CLASSES), size=clips)
    right = rng.random(clips) < 0.5
    preds = np.where(right, refs, rng.choice(list(CLASSES), size=clips))
    probs = np.full((clips, len(CLASSES)), 1 / len(CLASSES))
    attrs = attr_refs = None
    if attributes:
        attr_refs = rng.uniform(1, 7, size=(clips, 3))
        attrs = 0.6 * attr_refs + rng.normal(0, 1, size=(clips, 3)) + 1.0
    return Predictions([f"c{i}" for i in range(clips)], probs, list(preds), list(refs), CLASSES, attrs, attr_refs)


def _time(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main():
    from sklearn.metrics import f1_score

    from conilium import CLASSES
    from conilium.evaluate.bootstrap import bootstrap_indices, intervals, paired

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-draws", type=int, default=100)
    args = ap.parse_args()

    a, b = _predictions(args.clips, 0, False), _predictions(args.clips, 1, False)
    b.reference = a.reference
    ja, jb = _predictions(args.clips, 0, True), _predictions(args.clips, 1, True)
    jb.reference, jb.attribute_refs = ja.reference, ja.attribute_refs
    rows = [
        ("intervals, macro+micro-F1, one run", lambda: intervals(a, draws=args.draws, seed=0)),
        ("paired, macro+micro-F1, two runs", lambda: paired(a, b, draws=args.draws, seed=0)),
        ("paired, F1 + 3 CCCs, two runs", lambda: paired(ja, jb, draws=args.draws, seed=0)),
    ]
    print(f"{args.clips} clips x {len(CLASSES)} classes, {args.draws} draws, {args.repeats} repeats")
    for name, fn in rows:
        lo, med = _time(fn, args.repeats)
        print(f"  {name:<38} min {lo:7.3f} s  median {med:7.3f} s")
    refs, preds = np.asarray(a.reference), np.asarray(a.prediction)
    idx = bootstrap_indices(args.clips, args.loop_draws, 0)
    t0 = time.perf_counter()
    for i in idx:
        f1_score(refs[i], preds[i], labels=list(CLASSES), average="macro", zero_division=0)
        f1_score(refs[i], preds[i], labels=list(CLASSES), average="micro", zero_division=0)
    per = (time.perf_counter() - t0) / args.loop_draws
    print(f"  {'plain loop of f1_score, one run':<38} {per * args.draws:7.3f} s for {args.draws} draws "
          f"(extrapolated from {args.loop_draws})")


if __name__ == "__main__":
    main()
