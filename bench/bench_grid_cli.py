"""``train-grid --preset table2`` against the five ``train-head`` commands it replaces, each a
process of its own as a user runs them, wall time, on the demo corpus's demo-wavlm cache (the
study's head settings: 20 epochs, hidden 256, dropout 0.2) and, with ``--large-clips N``, on a
synthetic WavLM-large-shaped cache (1024-dim, 250–350 frames a clip, 3 epochs).

    OPENBLAS_NUM_THREADS=1 python bench/bench_grid_cli.py [--repeats 3] [--large-clips 300] [--json FILE]

Each repeat times the grid and the five commands in turn (their order alternating: the machine may
be shared) and reports the ratio grid / five commands, min and median over the repeats, and
whether every run's predictions are byte for byte those of its own train-head command.

What the grid saves is each command's fixed cost (starting Python, importing torch, opening the
cache, preparing targets and splits) four times over, and one read of the features per epoch
instead of five: where the heads' arithmetic is small beside that (the demo) the ratio is far below
one; where it dominates (WavLM-large width on a CPU, where one conilium head step already runs at the
speed of a plain PyTorch loop, bench_gpu's head row) five heads cost five heads' arithmetic and the
ratio tends to one.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The table2 preset's runs as train-head options (its common options: attentive pooling, weighted layers).
RUNS = {"wce-hard": ("wce", "hard"), "wbce-P": ("wbce", "P"), "wbce-S": ("wbce", "S"),
        "kld-P": ("kld", "P"), "kld-S": ("kld", "S")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else name


def timed(argv) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def compare(cache: Path, work: Path, *, settings: dict, repeats: int) -> dict:
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    grid_argv = [tool("train-grid"), "--preset", "table2", "--cache", str(cache), "--out", str(work / "grid"),
                 "--set", "device=cpu", *sets, "-q"]
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]

    def singles() -> dict:
        return {name: timed([tool("train-head"), "--cache", str(cache), "--loss", loss, "--labels", labels,
                             "--pooling", "attentive", "--layers", "weighted", "--device", "cpu", *flags,
                             "--out", str(work / "single" / name), "-q"])
                for name, (loss, labels) in RUNS.items()}

    grid_s, single_s, ratios = [], [], []
    for r in range(repeats):
        for d in ("grid", "single"):
            shutil.rmtree(work / d, ignore_errors=True)
        if r % 2 == 0:
            g = timed(grid_argv)
            s = singles()
        else:
            s = singles()
            g = timed(grid_argv)
        total = sum(s.values())
        grid_s.append(round(g, 2))
        single_s.append({k: round(v, 2) for k, v in s.items()})
        ratios.append(round(g / total, 3))
        log(f"  repeat {r + 1}: train-grid {g:.1f} s, five train-head {total:.1f} s, ratio {g / total:.3f}")
    same = all(filecmp.cmp(f, work / "single" / name / "predictions" / f.name, shallow=False)
               for name in RUNS for f in (work / "grid" / name / "predictions").iterdir())
    return {"settings": settings, "grid_seconds": grid_s, "single_seconds": single_s,
            "single_total_seconds": [round(sum(x.values()), 2) for x in single_s],
            "ratios": ratios, "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "predictions_bitwise_equal": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo-clips", type=int, default=400, help="clips of the demo corpus (the study's)")
    ap.add_argument("--large-clips", type=int, default=0, help="also a WavLM-large-shaped cache of this many clips")
    ap.add_argument("--work", type=Path, default=None, help="where corpus, caches and runs go (default: temp)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "grid_cli_cpu.json")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="conilium-grid-cli-"))
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS")},
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        corpus, cache = work / "demo", work / "cache-demo-wavlm"
        if not (corpus / "Labels").exists():
            subprocess.run([tool("make-demo-corpus"), "--out", str(corpus), "--clips", str(args.demo_clips), "-q"],
                           check=True)
        if not (cache / "manifest.json").exists():
            subprocess.run([tool("extract-features"), "--corpus", str(corpus), "--upstream", "demo-wavlm",
                            "--random-init", "--layers", "last", "--out", str(cache), "--device", "cpu", "-q"],
                           check=True)
        log(f"demo ({args.demo_clips} clips, demo-wavlm):")
        results["demo"] = compare(cache, work / "demo-runs", repeats=args.repeats,
                                  settings={"epochs": 20, "hidden": 256, "dropout": 0.2})
        if args.large_clips:
            from conilium.testing import write_synthetic_cache

            large = work / f"wavlm-large-shaped-{args.large_clips}"
            if not (large / "manifest.json").exists():
                write_synthetic_cache(large, clips=args.large_clips, dim=1024, stored_layers=(24,), all_layers=25,
                                      frames=(250, 350), seed=2, clips_per_shard=256, signal=0.3)
            log(f"WavLM-large-shaped ({args.large_clips} clips, 1024-dim):")
            results["wavlm_large_shaped"] = compare(large, work / "large-runs", repeats=args.repeats,
                                                    settings={"epochs": 3})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| cache | train-grid s (median) | five train-head s (median) | ratio min / median | predictions equal |")
    print("|---|---|---|---|---|")
    for key in ("demo", "wavlm_large_shaped"):
        if key in results:
            r = results[key]
            print(f"| {key} | {statistics.median(r['grid_seconds']):.1f} | "
                  f"{statistics.median(r['single_total_seconds']):.1f} | {r['ratio_min']:.3f} / "
                  f"{r['ratio_median']:.3f} | {'yes' if r['predictions_bitwise_equal'] else 'NO'} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    log(f"written to {args.json}")


if __name__ == "__main__":
    main()
