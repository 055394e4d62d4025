"""What thread-invariant heads cost, and a check that they are: a data pass of head runs
trained on each thread count, with the few operations torch computes differently on more
threads run on one thread (conilium's heads) and as torch runs them, in turn.

    python bench/bench_threads.py [--clips 400] [--dim 256] [--frames 100 300] [--epochs 2]
                                  [--threads 1 2] [--repeats 3] [--json FILE]

The heads (attentive pooling, weighted layers, hidden 1024, batch 16; WBCE on P, KLD on S,
WCE on hard targets) train on a synthetic cache (conilium.testing), preloaded, in one
process. For each thread count it prints the pass's training clips per second (min and
median of ``--repeats`` alternating measurements: the machine may be shared) with
conilium's one-thread operations and with torch's own, and whether every run's predictions
are bitwise the same on every thread count (they are with conilium's; with torch's they
differ from 2 threads on). Set OPENBLAS_NUM_THREADS=1 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
from pathlib import Path

import torch


def train_pass(cache, threads: int, out: Path, *, epochs: int, own: bool):
    """(training clips per second, a digest of each run's predictions) of one pass."""
    import conilium.runtime as runtime
    from conilium.heads.train import TrainConfig, train_heads

    ours = runtime.on_one_thread
    if own:  # torch's own layers: the same computation on every thread
        runtime.on_one_thread = lambda fn, *inputs: fn(*inputs)
    try:
        configs = [TrainConfig(cache=str(cache.path), device="cpu", epochs=epochs, batch_size=16, preload="yes",
                               loss=loss, labels=labels, threads=threads)
                   for loss, labels in (("wbce", "P"), ("kld", "S"), ("wce", "hard"))]
        results = train_heads([(c, out / f"{c.loss}-{c.labels}") for c in configs], overwrite=True, progress=False)
    finally:
        runtime.on_one_thread = ours
    digests, speed = [], []
    for c, r in zip(configs, results):
        if not isinstance(r, dict):
            raise SystemExit(f"{c.loss}-{c.labels}: {r}")
        h = hashlib.sha256()
        for p in sorted((out / f"{c.loss}-{c.labels}" / "predictions").iterdir()):
            h.update(p.read_bytes())
        digests.append(h.hexdigest()[:12])
        speed.append(r["training"]["clips_per_second"])
    return speed[0], digests


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--frames", type=int, nargs=2, default=(100, 300))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from conilium.testing import write_synthetic_cache

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = write_synthetic_cache(tmp / "cache", clips=args.clips, dim=args.dim, frames=tuple(args.frames),
                                      seed=0, signal=0.5)
        speeds = {(t, own): [] for t in args.threads for own in (False, True)}
        digests = {}
        for _ in range(args.repeats):
            for t in args.threads:
                for own in (False, True):
                    cps, d = train_pass(cache, t, tmp / "runs", epochs=args.epochs, own=own)
                    speeds[(t, own)].append(cps)
                    digests[(t, own)] = d
    rows = []
    print(f"torch {torch.__version__}, {args.clips} clips (60 % Train), dim {args.dim}, frames {args.frames}, "
          f"3 heads in one pass, {args.epochs} epochs")
    print("| threads | layers | Train clips/s (min / median) | predictions as on 1 thread |")
    print("|---|---|---|---|")
    for t in args.threads:
        for own in (False, True):
            v = speeds[(t, own)]
            same = digests[(t, own)] == digests[(args.threads[0], own)]
            label = "torch's own" if own else "conilium (one-thread ops)"
            print(f"| {t} | {label} | {min(v):.0f} / {statistics.median(v):.0f} | {'yes' if same else 'NO'} |")
            rows.append({"threads": t, "layers": "torch" if own else "conilium", "clips_per_second_min": min(v),
                         "clips_per_second_median": statistics.median(v), "same_as_first_thread_count": same})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
