"""Benchmark of extract-features: where the time goes, and how much padding costs.

On one demo corpus (MSP-Podcast-like clip durations: gamma, mean 5.8 s, sd 2.4 s, 1.5 to
14 s, truncated to 8 s), for each upstream (default: the small demo-wavlm and the real
wavlm-large architecture, both with seeded random weights) it extracts the last layer
and prints

* forward share: time in the upstream's forward pass / wall time of the extraction loop
  (decoding, forward, HDF5 writing; target >= 0.90 on CPU), and / the whole call
  (model loading and the Train mean/std pass included);
* padding: transformer frames computed / frames of the clips (target <= 1.05);
* clips/s and the real-time factor (loop wall seconds per second of audio).

    python bench/bench_extract.py [--clips N] [--upstream NAME ...] [--device cpu|cuda] [--json OUT]

With ``--device cuda`` the forward runs under bfloat16 autocast (float16 where bf16 is
not supported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _read_speed(cache_dir: Path) -> dict:
    """Read every clip of the cache back once (a cold-ish pass, then the page cache helps)."""
    from conilium.cache import FeatureCache

    cache = FeatureCache(cache_dir)
    t = time.perf_counter()
    nbytes = 0
    for n in cache.names:
        nbytes += cache.frames(n, dtype=None).nbytes
    dt = time.perf_counter() - t
    cache.close()
    return {"read_clips_per_second": round(len(cache) / dt, 1), "read_mb_per_second": round(nbytes / dt / 1e6, 1),
            "cache_mb": round(sum(p.stat().st_size for p in (cache_dir / "shards").glob("*.h5")) / 1e6, 2),
            "frames_mb": round(nbytes / 1e6, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=32, help="demo clips to extract (default 32)")
    ap.add_argument("--upstream", action="append", default=None,
                    help="registry name, repeatable (default: demo-wavlm and wavlm-large)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--batch-seconds", type=float, default=None,
                    help="bound on a batch's padded audio (default: extract-features' own, 60 s CPU / 300 s CUDA)")
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--layers", default="last")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build the corpus and caches (temp)")
    args = ap.parse_args(argv)

    from conilium.demo import make_demo_corpus
    from conilium.extract import ExtractConfig, ExtractStats, extract_features

    if args.threads:
        torch.set_num_threads(args.threads)
    upstreams = args.upstream or ["demo-wavlm", "wavlm-large"]
    work = Path(tempfile.mkdtemp(prefix="bench_extract_", dir=args.workdir))
    results = {"bench": "extract", "clips": args.clips, "device": args.device,
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "platform": platform.platform(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else None,
               "batch_seconds": args.batch_seconds, "workers": args.workers, "runs": []}
    try:
        t = time.perf_counter()
        corpus = make_demo_corpus(work / "corpus", clips=args.clips, seed=0)
        print(f"demo corpus: {args.clips} clips in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for name in upstreams:
            st = ExtractStats()
            extract_features(ExtractConfig(name, random_init=True, seed=0, layers=args.layers), corpus,
                             work / f"cache-{name}", device=args.device, batch_seconds=args.batch_seconds,
                             workers=args.workers, verbose=False, stats=st)
            d = st.as_dict()
            run = {
                "upstream": name,
                "device": st.device,
                "compute_dtype": st.compute_dtype,
                "batch_seconds": st.batch_seconds,
                "clips": st.clips,
                "audio_seconds": round(st.audio_seconds, 2),
                "wall_seconds": round(st.wall_seconds, 3),
                "loop_seconds": round(st.loop_seconds, 3),
                "forward_seconds": round(st.forward_seconds, 3),
                "forward_fraction_loop": round(st.forward_fraction, 4),
                "forward_fraction_wall": round(st.forward_seconds / st.wall_seconds, 4),
                "computed_frames": st.computed_frames,
                "useful_frames": st.useful_frames,
                "padding_ratio": round(d["padding_ratio"], 4),
                "clips_per_second": round(st.clips / st.loop_seconds, 3),
                "real_time_factor": round(st.loop_seconds / st.audio_seconds, 5),
                "audio_seconds_per_second": round(st.audio_seconds / st.loop_seconds, 2),
            }
            run.update(_read_speed(work / f"cache-{name}"))
            results["runs"].append(run)
            print(f"{name:>14} [{run['device']}, {run['compute_dtype']}]: {run['clips']} clips, "
                  f"{run['audio_seconds']:.0f} s of audio | forward share {run['forward_fraction_loop']:.3f} of the "
                  f"loop ({run['forward_fraction_wall']:.3f} of the whole call) | computed/useful frames "
                  f"{run['padding_ratio']:.4f} | {run['clips_per_second']:.2f} clips/s | real-time factor "
                  f"{run['real_time_factor']:.4f} ({run['audio_seconds_per_second']:.1f} s of audio per s) | "
                  f"loop {run['loop_seconds']:.1f} s, whole call {run['wall_seconds']:.1f} s | reading back: "
                  f"{run['read_clips_per_second']:.0f} clips/s, {run['read_mb_per_second']:.0f} MB/s")
            shutil.rmtree(work / f"cache-{name}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
