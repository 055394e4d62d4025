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

``--forward`` times the one upstream forward alone instead (no pipeline), clip by clip,
on ``--forward-clips`` demo clips spread over the corpus's durations, ``--repeats`` rounds
in which every variant runs once in turn (so that a loaded machine slows all alike):
seconds of forward per second of audio (min and median over the rounds) and each
variant's ratio to the first (ratio of the mins, ratio of the medians, median of the
per-round ratios). A Whisper upstream runs twice, with its own 30 s input and with
the input cut to the clip (``whisper_input="clip"``), and the relative difference
‖F(30 s) − F(clip)‖ / ‖F(30 s)‖ of the clips' valid frames is given per hidden state
(first, middle, last):

    python bench/bench_extract.py --forward --upstream wavlm-large --upstream whisper-large-v3
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
    ap.add_argument("--forward", action="store_true",
                    help="time the upstream forward alone (Whisper: 30 s and clip-length input), see above")
    ap.add_argument("--forward-clips", type=int, default=3, help="clips timed by --forward (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of --forward (default 3)")
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="keep the random weights here (reused by later runs; default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.forward:
        return forward_main(args)

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


def _spread(corpus_root, n: int):
    """``n`` clips of the corpus spread over its durations (shortest … longest), read as extraction reads them."""
    from conilium.audio import read_audio
    from conilium.corpus import load_corpus

    corpus = load_corpus(corpus_root, read_durations=True)
    clips = sorted(corpus.clips.values(), key=lambda c: (c.duration or 0.0, c.name))
    picks = [clips[round(i * (len(clips) - 1) / max(1, n - 1))] for i in range(n)]
    return [(c.name, read_audio(corpus.audio_path(c.name), max_seconds=8.0)) for c in picks]


def forward_main(args) -> int:
    import numpy as np

    from conilium.demo import make_demo_corpus
    from conilium.extract.encoder import UpstreamRunner
    from conilium.extract.upstreams import load_upstream

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    names = args.upstream or ["wavlm-large", "whisper-large-v3"]
    work = Path(tempfile.mkdtemp(prefix="bench_forward_", dir=args.workdir))
    results = {"bench": "extract-forward", "device": device.type, "torch_threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
               "repeats": args.repeats, "variants": [], "whisper_input_difference": {}}
    try:
        clips = _spread(make_demo_corpus(work / "corpus", clips=max(10, args.forward_clips), seed=0),
                        args.forward_clips)
        audio = sum(len(x) for _, x in clips) / 16000
        results["clips"] = [{"name": n, "seconds": round(len(x) / 16000, 3)} for n, x in clips]
        variants = []  # (label, runner)
        for name in names:
            t = time.perf_counter()
            model, _ = load_upstream(name, random_init=True, seed=0, random_root=args.weights_dir or work / "weights")
            load = time.perf_counter() - t
            last = model.config.num_hidden_layers
            layers = sorted({0, last // 2, last})
            whisper = model.config.model_type == "whisper"
            for mode in (("30s", "clip") if whisper else ("30s",)):
                label = f"{name} ({mode} input)" if whisper else name
                runner = UpstreamRunner(model, device=device, compute_dtype="float32", layers=layers,
                                        whisper_input=mode)
                variants.append((label, runner, layers))
            print(f"{name}: loaded in {load:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
                  f"parameters)", file=sys.stderr)
        for _, runner, _ in variants:  # warm-up: one short clip each
            runner([clips[0][1][:16000]])
        times = {label: [] for label, _, _ in variants}
        feats = {}
        for r in range(args.repeats):
            for label, runner, _ in variants:
                t = time.perf_counter()
                out = [runner([x])[0][0] for _, x in clips]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[label].append(time.perf_counter() - t)
                feats[label] = out
                print(f"round {r + 1}: {label}: {times[label][-1]:.2f} s for {audio:.1f} s of audio", file=sys.stderr)
        ref = variants[0][0]
        for label, runner, layers in variants:
            ts = np.array(times[label])
            tr = np.array(times[ref])
            results["variants"].append({
                "variant": label, "layers": layers,
                "audio_seconds": round(audio, 2),
                "seconds_per_audio_second_min": round(float(ts.min() / audio), 4),
                "seconds_per_audio_second_median": round(float(np.median(ts) / audio), 4),
                f"ratio_to_{ref}_of_mins": round(float(ts.min() / tr.min()), 3),
                f"ratio_to_{ref}_of_medians": round(float(np.median(ts) / np.median(tr)), 3),
                f"ratio_to_{ref}_median_per_round": round(float(np.median(ts / tr)), 3),
                "computed_frames": runner.computed_frames, "useful_frames": runner.useful_frames,
            })
        for label, _, layers in variants:
            if label.endswith("(clip input)"):
                full = label.replace("(clip input)", "(30s input)")
                diff = {}
                for k, layer in enumerate(layers):
                    rel = [float(np.linalg.norm(a[:, k] - b[:, k]) / np.linalg.norm(a[:, k]))
                           for a, b in zip(feats[full], feats[label])]
                    diff[f"hidden_state_{layer}"] = {"mean": round(float(np.mean(rel)), 4),
                                                     "max": round(float(np.max(rel)), 4),
                                                     "per_clip": [round(x, 4) for x in rel]}
                ts, tc = np.array(times[full]), np.array(times[label])
                diff["forward_time_ratio_30s_to_clip"] = {
                    "of_mins": round(float(ts.min() / tc.min()), 2),
                    "of_medians": round(float(np.median(ts) / np.median(tc)), 2),
                    "median_per_round": round(float(np.median(ts / tc)), 2)}
                results["whisper_input_difference"][label.split(" (")[0]] = diff
        for v in results["variants"]:
            print(f"{v['variant']:>32}: {v['seconds_per_audio_second_min']:.3f} s per s of audio (min), "
                  f"{v['seconds_per_audio_second_median']:.3f} (median); vs {ref}: "
                  f"{v[f'ratio_to_{ref}_of_mins']:.2f}x (mins), {v[f'ratio_to_{ref}_of_medians']:.2f}x (medians), "
                  f"{v[f'ratio_to_{ref}_median_per_round']:.2f}x (median per round)")
        for name, d in results["whisper_input_difference"].items():
            print(f"{name}: 30 s vs clip-length input: relative difference "
                  + ", ".join(f"{k} mean {v['mean']:.4f} max {v['max']:.4f}" for k, v in d.items()
                              if k.startswith("hidden_state"))
                  + f"; forward time 30 s / clip {d['forward_time_ratio_30s_to_clip']['of_medians']:.2f}x (medians)")
        for _, runner, _ in variants:
            runner.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
