"""Benchmark of stage 2 (train-head): prints measured figures, optionally writes them as JSON.

    python bench/bench_heads.py [--json OUT] [--workdir DIR] [--e2e-steps 3] [--skip-e2e] [--only SECTION ...]

In one run, on this machine (``--only`` picks sections: throughput, e2e, ratio, read, rss,
grid):

1. head training throughput (clips/s, training steps only) on the demo cache (demo
   corpus through the small random-init demo-wavlm, every layer) and on a cache shaped
   like WavLM-large last-layer frames (1024-dim, the demo Train clips' frame counts;
   synthetic values, same shapes and bytes);
2. the same Train clips through an end-to-end training step of the wavlm-large
   architecture (random weights, AdamW, the same attentive head and WBCE loss), and the
   ratio head / end-to-end;
3. cache read throughput (MB/s of stored feature bytes) through FeatureCache, against
   plain sequential reading of the same shard files, both cold (pages dropped with
   posix_fadvise(DONTNEED), no root needed) and warm (page cache);
4. peak RSS of train-head, run as a subprocess (its own VmHWM), streaming from two
   WavLM-large-shaped caches of different sizes, and preloading the larger one for contrast;
5. ratio: a head epoch (WavLM-large-shaped, last layer, training steps only) against one
   end-to-end wavlm-large step, per clip, measured in turn ``--ratio-repeats`` times in
   this process (the machine is noisy: min and median of the ratios);
6. grid: ``train-grid --preset table2`` (5 heads, one data pass) against the five single
   ``train-head`` runs of the same configurations, wall time, on a ``--grid-clips``-clip
   cache of WavLM-large-shaped frames (≈300 × 1024 float16 a clip), and whether every
   grid run equals its single run (predictions bitwise); the same grid with ``--stack-heads on``
   (the five heads as one stacked module) and its largest score difference from the single
   runs; then the paper's whole grid per
   upstream projected on one H100 from the H100 head rates in bench/results/heads_cuda.json.

Everything is built under --workdir (a temporary folder by default, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def log(msg):
    print(msg, flush=True)


def build_demo_cache(work: Path) -> Path:
    from conilium.demo import make_demo_corpus
    from conilium.extract import ExtractConfig, extract_features

    corpus = work / "demo-corpus"
    if not (corpus / "Labels").is_dir():
        make_demo_corpus(corpus, clips=300, seed=0)
    config = ExtractConfig("demo-wavlm", random_init=True, seed=0, layers="all", pooled_stats=True)
    return Path(extract_features(config, corpus, work / "demo-cache", device="cpu", verbose=False))


def head_throughput(cache: Path, out: Path, *, epochs: int, preload: str, layers="weighted", device="cpu",
                    num_workers: int = 0) -> dict:
    from conilium.heads.train import TrainConfig, train_head

    t0 = time.perf_counter()
    m = train_head(TrainConfig(cache=str(cache), loss="wbce", labels="S" if layers == "weighted" else "hard",
                               epochs=epochs, device=device, preload=preload, layers=layers,
                               num_workers=num_workers),
                   out, overwrite=True, progress=False)
    tr = m["training"]
    # the median epoch after the first (the first one pays thread-pool / CUDA start-up)
    per_epoch = [h["train_seconds"] for h in m["history"]]
    typical = float(np.median(per_epoch[1:] if len(per_epoch) > 1 else per_epoch))
    return {"clips": tr["clips"], "epochs": tr["epochs_run"], "preloaded": tr["preloaded"], "num_workers": num_workers,
            "clips_per_s": round(tr["clips"] / typical, 2), "epoch_train_seconds": per_epoch,
            "wall_s": round(time.perf_counter() - t0, 2), "feature_mb": round(tr["feature_bytes"] / 1e6, 1)}


class EndToEnd:
    """Training steps of wavlm-large (random weights) + attentive head on raw audio of ``names``."""

    def __init__(self, work: Path, corpus: Path, names, *, batch: int, device: str = "cpu"):
        import torch

        from conilium.corpus import load_corpus
        from conilium.extract.upstreams import load_upstream
        from conilium.heads.model import EmotionHead, HeadConfig

        t_load = time.perf_counter()
        self.upstream, _ = load_upstream("wavlm-large", random_init=True, seed=0, random_root=work / "upstreams")
        self.load_s = time.perf_counter() - t_load
        self.dev = torch.device(device)
        self.upstream.to(self.dev).train()
        self.head = EmotionHead(HeadConfig(dim=self.upstream.config.hidden_size, num_layers=1, layers=0)).to(self.dev)
        params = list(self.upstream.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-5)
        self.corpus = load_corpus(corpus, read_durations=False)
        self.names = list(names)
        self.order = np.random.default_rng(0).permutation(len(self.names))
        self.batch = batch
        self.steps = 0
        self.n_params = sum(p.numel() for p in self.upstream.parameters())

    def step(self) -> float:
        """One training step; its seconds (reading the audio not counted)."""
        import torch

        from conilium.audio import read_audio
        from conilium.training.losses import loss_fn

        idx = self.order[(self.steps * self.batch) % len(self.names):][: self.batch]
        self.steps += 1
        waves = [read_audio(self.corpus.audio_path(self.names[i]), max_seconds=8.0) for i in idx]
        t0 = time.perf_counter()
        n = max(len(w) for w in waves)
        x = torch.zeros(len(waves), n)
        mask = torch.zeros(len(waves), n, dtype=torch.long)
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        x, mask = x.to(self.dev), mask.to(self.dev)
        hs = self.upstream(x, attention_mask=mask).last_hidden_state  # (B, T, D)
        lengths = self.upstream._get_feat_extract_output_lengths(mask.sum(1)).clamp(max=hs.shape[1])
        logits = self.head(hs.unsqueeze(2), lengths)
        y = torch.full((len(waves), 8), 1 / 8, device=self.dev)
        loss = loss_fn("wbce")(logits, y, None)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def e2e_throughput(work: Path, corpus: Path, names, *, steps: int, batch: int, device: str = "cpu") -> dict:
    """Training steps of wavlm-large (random weights) + attentive head on raw audio of ``names``."""
    e2e = EndToEnd(work, corpus, names, batch=batch, device=device)
    times = []
    for step in range(steps + 1):  # the first step warms up and is not counted
        dt = e2e.step()
        if step > 0:
            times.append(dt)
        log(f"  e2e step {step}{' (warm-up)' if step == 0 else ''}: {dt:.1f} s for {batch} clips")
    return {"upstream_params_M": round(e2e.n_params / 1e6, 1), "batch": batch, "steps_timed": steps,
            "seconds_per_step": round(float(np.mean(times)), 2),
            "clips_per_s": round(batch / float(np.mean(times)), 3), "load_s": round(e2e.load_s, 1)}


def head_vs_e2e(work: Path, large: Path, corpus: Path, names, frames, *, repeats: int, batch: int,
                device: str = "cpu") -> dict:
    """Head epoch (training steps only, the second epoch of a 2-epoch run) against one end-to-end
    step, per clip, measured in turn ``repeats`` times after one warm-up of each.

    Every end-to-end step trains on the same ``batch`` corpus clips (``names``, with their
    lengths ``frames``): those nearest the mean length of the clips the head epoch trains on,
    so that the ratios differ by the machine's noise only, not by the clips drawn."""
    from conilium.cache.reader import FeatureCache
    from conilium.heads.train import TrainConfig, prepare, train_head

    config = TrainConfig(cache=str(large), loss="wbce", labels="hard", epochs=2, device=device, preload="auto",
                         layers=-1)
    head_cache = FeatureCache(large)
    mean = float(np.mean([head_cache.num_frames(n) for n in prepare(config, cache=head_cache).train_names]))
    typical = sorted(range(len(names)), key=lambda i: (abs(frames[i] - mean), i))[:batch]
    e2e = EndToEnd(work, corpus, [names[i] for i in typical], batch=batch, device=device)

    def head_rate() -> float:
        m = train_head(config, work / "runs" / "ratio", overwrite=True, progress=False)
        return m["training"]["clips"] / m["history"][-1]["train_seconds"]

    head_rate(), e2e.step()  # warm-up
    heads, e2es, ratios = [], [], []
    for r in range(repeats):
        h = head_rate()
        e = batch / e2e.step()
        heads.append(round(h, 2))
        e2es.append(round(e, 4))
        ratios.append(round(h / e, 1))
        log(f"  repeat {r + 1}: head {h:.1f} clips/s, end-to-end {e:.4f} clips/s, ratio {h / e:.0f}x")
    return {"repeats": repeats, "e2e_batch": batch, "e2e_clip_frames": [int(frames[i]) for i in typical],
            "head_clip_frames_mean": round(mean, 1), "head_clips_per_s": heads, "e2e_clips_per_s": e2es,
            "ratios": ratios, "ratio_min": min(ratios), "ratio_median": float(np.median(ratios)),
            "head_clips_per_s_median": float(np.median(heads)), "e2e_clips_per_s_median": float(np.median(e2es))}


def _drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_throughput(cache_dir: Path) -> dict:
    from conilium.cache.reader import FeatureCache

    cache = FeatureCache(cache_dir)
    shards = [cache.path / s["file"] for s in cache.manifest["shards"]]
    file_bytes = sum(p.stat().st_size for p in shards)
    out = {"cache": str(cache_dir), "clips": len(cache), "shard_bytes_mb": round(file_bytes / 1e6, 1)}
    for state in ("cold", "warm"):
        if state == "cold":
            _drop_cache(shards)
        repeats = 1 if state == "cold" else 3  # warm: best of three
        plain = via = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = 0
            for p in shards:
                with open(p, "rb", buffering=0) as f:
                    while True:
                        b = f.read(1 << 22)
                        if not b:
                            break
                        n += len(b)
            plain = min(plain, time.perf_counter() - t0)
        if state == "cold":
            _drop_cache(shards)
        for _ in range(repeats):
            cache.close()
            t0 = time.perf_counter()
            feat = 0
            for name in cache.names:
                feat += cache.frames(name, dtype=np.float16).nbytes
            via = min(via, time.perf_counter() - t0)
        out[state] = {"plain_read_mb_s": round(n / plain / 1e6, 1),
                      "featurecache_mb_s": round(feat / via / 1e6, 1),
                      "ratio": round((feat / via) / (n / plain), 3)}
    out["feature_bytes_mb"] = round(feat / 1e6, 1)
    cache.close()
    return out


# The child reports its own peak RSS (VmHWM of /proc/self/status) when it exits. (The
# ru_maxrss of wait4()/RUSAGE_CHILDREN is no good here: Linux starts a child's figure at
# its parent's RSS when it forks, and this benchmark's process is large by then.)
_REPORT = ("import atexit\n"
           "def _hwm():\n"
           "    for line in open('/proc/self/status'):\n"
           "        if line.startswith('VmHWM:'):\n"
           "            print('PEAK_RSS_KB', line.split()[1], flush=True)\n"
           "atexit.register(_hwm)\n")


def _child_peak_kb(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            return int(line.split()[1])
    raise RuntimeError(f"no peak RSS reported:\n{text}")


def import_rss() -> float:
    """Peak RSS (MB) of a Python process that only imports train-head: the floor of every run."""
    code = _REPORT + "import conilium.cli.heads, conilium.heads.train"  # the command and what it runs
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(_child_peak_kb(out) / 1024, 1)


def peak_rss(cache: Path, out: Path, *, preload: str, epochs: int = 1, device: str = "cpu") -> dict:
    """Run train-head in a subprocess; its peak RSS as it reports it."""
    code = _REPORT + "import sys\nfrom conilium.cli.heads import train_head_cmd\n" \
        "train_head_cmd(sys.argv[1:], prog_name='train-head')\n"
    args = [sys.executable, "-c", code, "--cache", str(cache), "--out", str(out), "--loss", "wbce", "--labels", "hard",
            "--layers", "-1", "--epochs", str(epochs), "--device", device, "--preload", preload, "--overwrite",
            "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train-head failed:\n{proc.stdout}")
    kb = _child_peak_kb(proc.stdout)
    return {"preload": preload, "peak_rss_mb": round(kb / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def cache_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*.h5")) / 1e6, 1)


def _time_single_runs(runs, work: Path, out: dict):
    """Each run alone through train_head: wall seconds per run, total process CPU seconds."""
    from conilium.heads.train import train_head

    singles, cpu = {}, 0.0
    for name, config, _ in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        m = train_head(config, work / "grid-single" / name, overwrite=True, progress=False)
        singles[name] = round(time.perf_counter() - t0, 2)
        cpu += time.process_time() - c0
        out["train_clips"] = m["training"]["clips"]
        log(f"  train-head {name}: {singles[name]} s")
    return singles, cpu


def _time_grid(runs, work: Path, folder: str = "grid"):
    """The runs through train-grid (n_jobs=1: in this process): wall and process CPU seconds."""
    from conilium.heads.grid import run_grid

    shutil.rmtree(work / folder, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = run_grid(runs, work / folder, n_jobs=1, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if any(row["status"] != "trained" for row in rows):
        raise RuntimeError(f"train-grid failed: {rows}")
    log(f"  train-grid ({folder}): {wall:.1f} s")
    return wall, cpu


def _largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the scores of two predictions CSVs of the same clips."""
    import csv

    def scores(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        cols = [k for k in rows[0] if k not in ("FileName", "Prediction", "Reference")]
        return np.array([[float(r[k]) for k in cols] for r in rows])

    return float(np.abs(scores(a) - scores(b)).max())


def grid_vs_single(work: Path, *, clips: int, epochs: int, device: str = "cpu", repeats: int = 1) -> dict:
    """``train-grid --preset table2`` (one data pass of 5 heads) against the five single train-head
    runs of the same configurations, wall time, on a cache of ``clips`` WavLM-large-shaped clips
    (≈300 × 1024 float16 frames each); and whether each grid run equals its single run."""
    import filecmp

    from conilium.heads.grid import expand_spec, load_spec
    from conilium.heads.train import plan_passes
    from conilium.testing import write_synthetic_cache

    cache = work / f"wavlm-large-shaped-{clips}"
    if not (cache / "manifest.json").is_file():
        log(f"  building a {clips}-clip WavLM-large-shaped cache (250–350 frames × 1024, float16) …")
        write_synthetic_cache(cache, clips=clips, dim=1024, stored_layers=(24,), all_layers=25, frames=(250, 350),
                              seed=2, clips_per_shard=256, signal=0.3)
    runs = expand_spec(load_spec(preset="table2"), cache=cache, overrides={"epochs": epochs, "device": device})
    passes = [[runs[i][0] for i in group] for group in plan_passes([c for _, c, _ in runs])]
    out = {"clips": clips, "cache_mb": cache_mb(cache), "epochs": epochs, "runs": len(runs), "passes": passes}
    stacked = [(name, replace(config, stack_heads="on"), paper) for name, config, paper in runs]
    ratios, cpu_ratios, singles_s, grids_s, same = [], [], [], [], True
    stacked_s, stacked_ratios, stacked_vs_grid, largest = [], [], [], 0.0
    for r in range(repeats):
        if r % 2 == 0:  # alternate the order
            singles, cpu_single = _time_single_runs(runs, work, out)
            grid_s, cpu_grid = _time_grid(runs, work)
            stack_s, _ = _time_grid(stacked, work, "grid-stacked")
        else:
            stack_s, _ = _time_grid(stacked, work, "grid-stacked")
            grid_s, cpu_grid = _time_grid(runs, work)
            singles, cpu_single = _time_single_runs(runs, work, out)
        cpu_ratios.append(round(cpu_grid / cpu_single, 3))
        for name, _, _ in runs:
            a, b = work / "grid" / name / "predictions", work / "grid-single" / name / "predictions"
            same &= all(filecmp.cmp(f, b / f.name, shallow=False) for f in a.iterdir())
            c = work / "grid-stacked" / name / "predictions"
            largest = max([largest] + [_largest_difference(f, c / f.name) for f in b.iterdir()])
        total = sum(singles.values())
        ratios.append(round(grid_s / total, 3))
        stacked_ratios.append(round(stack_s / total, 3))
        stacked_vs_grid.append(round(stack_s / grid_s, 3))
        singles_s.append(singles)
        grids_s.append(round(grid_s, 2))
        stacked_s.append(round(stack_s, 2))
        log(f"  repeat {r + 1}: train-grid {grid_s:.1f} s, stacked {stack_s:.1f} s, five train-head runs "
            f"{total:.1f} s, ratios {grid_s / total:.3f} and {stack_s / total:.3f} (CPU time: {cpu_ratios[-1]})")
    out.update({"single_seconds": singles_s, "single_total_seconds": [round(sum(x.values()), 2) for x in singles_s],
                "grid_seconds": grids_s, "ratios": ratios, "ratio_min": min(ratios),
                "ratio_median": float(np.median(ratios)),
                # process CPU time of every thread: another view (threads waiting on a busy machine inflate it too)
                "cpu_time_ratios": cpu_ratios, "predictions_bitwise_equal": same,
                # --stack-heads on: the five heads as one stacked module
                "stacked_grid_seconds": stacked_s, "stacked_ratios": stacked_ratios,
                "stacked_ratio_min": min(stacked_ratios), "stacked_ratio_median": float(np.median(stacked_ratios)),
                "stacked_vs_grid": stacked_vs_grid,
                "stacked_largest_score_difference": largest})
    return out


#: The paper's grid per upstream, as the presets run it: runs per data pass.
PAPER_PASSES = {"table2": [5], "sampler": [2, 4], "table3": [1, 1, 1, 1]}
MSP_TRAIN, MSP_DEV, EPOCHS = 68_000, 19_800, 40


def gpu_projection(cuda_json: Path, head_speedup: float = 1.0) -> dict:
    """The paper's grid per upstream on one H100, projected from the head rates measured there
    before the data pass was shared (bench/results/heads_cuda.json), with an additive model:
    a clip costs ``feed`` once per pass (read, collate, move: the streamed rate's time less the
    preloaded one's) plus ``head`` per head (the preloaded rate's time: an upper bound, it still
    holds the old collate), divided by ``head_speedup`` (a head step's speed-up measured
    elsewhere; 1: no credit). 40 epochs of Train + Development scoring, then one prediction of
    Train + Development; the test splits are left out."""
    if not cuda_json.is_file():
        return {"note": f"no {cuda_json}: nothing to project from"}
    ht = json.loads(cuda_json.read_text())["head_training"]
    streamed = ht["wavlm_large_shaped_streamed_4_workers"]["clips_per_s"]
    preloaded = ht["wavlm_large_shaped"]["clips_per_s"]
    feed = max(1 / streamed - 1 / preloaded, 0.0)
    head = 1 / preloaded / head_speedup
    clips = (EPOCHS + 1) * (MSP_TRAIN + MSP_DEV)
    runs = sum(sum(p) for p in PAPER_PASSES.values())
    before = runs * clips * (feed + 1 / preloaded)
    after = sum(clips * (feed + k * head) for p in PAPER_PASSES.values() for k in p)
    # the same with the loader workers reading while the GPU computes: a clip costs the larger of the two
    before_overlap = runs * clips * (1 / streamed)
    after_overlap = sum(clips * max(1 / streamed, k * head) for p in PAPER_PASSES.values() for k in p)
    return {"source": str(cuda_json.name), "gpu": "NVIDIA H100 80GB HBM3 (measured before this change)",
            "streamed_4_workers_clips_per_s": streamed, "preloaded_clips_per_s": preloaded,
            "head_speedup_credited": head_speedup,
            "feed_ms_per_clip": round(1000 * feed, 3), "head_ms_per_clip": round(1000 * head, 3),
            "runs": runs, "passes": sum(len(p) for p in PAPER_PASSES.values()),
            "hours_one_run_at_a_time": round(before / 3600, 2), "hours_one_pass_per_group": round(after / 3600, 2),
            "ratio": round(after / before, 3),
            "overlapped_hours_one_run_at_a_time": round(before_overlap / 3600, 2),
            "overlapped_hours_one_pass_per_group": round(after_overlap / 3600, 2),
            "overlapped_ratio": round(after_overlap / before_overlap, 3), "kind": "projection, not a measurement"}


SECTIONS = ("throughput", "e2e", "ratio", "read", "rss", "grid")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--workdir", type=Path, help="where to build corpora and caches (kept); default: a temp dir")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (default: all)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the head throughput runs")
    ap.add_argument("--e2e-steps", type=int, default=3, help="timed end-to-end steps (after one warm-up step)")
    ap.add_argument("--e2e-batch", type=int, default=2)
    ap.add_argument("--skip-e2e", action="store_true", help="skip the wavlm-large end-to-end steps (e2e and ratio)")
    ap.add_argument("--ratio-repeats", type=int, default=5,
                    help="head epoch / end-to-end step pairs measured in turn (section ratio)")
    ap.add_argument("--grid-clips", type=int, default=1000, help="clips of the cache of the grid section")
    ap.add_argument("--grid-epochs", type=int, default=3, help="epochs of each run of the grid section")
    ap.add_argument("--grid-repeats", type=int, default=1, help="grid / single-runs measurements")
    ap.add_argument("--head-speedup", type=float, default=1.0,
                    help="credit this speed-up of a head step in the GPU projection (default: none)")
    ap.add_argument("--device", default="cpu", help="torch device of the training runs (cpu, cuda)")
    ap.add_argument("--rss-clips", type=int, nargs=2, default=(300, 3000),
                    help="clips of the small and large WavLM-large-shaped caches for the peak-RSS runs")
    args = ap.parse_args(argv)
    sections = set(args.only or SECTIONS)
    if args.skip_e2e:
        sections -= {"e2e", "ratio"}

    import torch

    from conilium.cache.reader import FeatureCache
    from conilium.testing import write_synthetic_cache

    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="bench-heads-")
        work = Path(tmp)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                           "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
                           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                           "torch": torch.__version__}}
    try:
        log("building the demo corpus and demo-wavlm cache …")
        demo = build_demo_cache(work)
        dcache = FeatureCache(demo)
        train_names = dcache.split("Train")
        frames = [dcache.num_frames(n) for n in dcache.names]
        corpus = Path(dcache.manifest["corpus_root"])
        log("building a WavLM-large-shaped cache (1024-dim last layer) with the demo clips' frame counts …")
        large = work / "wavlm-large-shaped"
        if not (large / "manifest.json").is_file():
            write_synthetic_cache(large, dim=1024, stored_layers=(24,), all_layers=25, num_frames=frames, seed=0,
                                  clips_per_shard=256, signal=0.3)

        r1 = {}
        if "throughput" in sections:
            log("1. head training throughput (median epoch after the first)")
            head_throughput(demo, work / "runs" / "warm-up", epochs=1, preload="auto", device=args.device)
            r1 = {"demo_cache": head_throughput(demo, work / "runs" / "demo", epochs=args.epochs, preload="auto",
                                                 device=args.device),
                  "demo_cache_streamed": head_throughput(demo, work / "runs" / "demo-s", epochs=args.epochs,
                                                         preload="no", device=args.device),
                  "wavlm_large_shaped": head_throughput(large, work / "runs" / "large", epochs=args.epochs,
                                                        preload="auto", layers=-1, device=args.device),
                  "wavlm_large_shaped_streamed": head_throughput(large, work / "runs" / "large-s", epochs=args.epochs,
                                                                 preload="no", layers=-1, device=args.device),
                  "wavlm_large_shaped_streamed_4_workers": head_throughput(
                      large, work / "runs" / "large-s4", epochs=args.epochs, preload="no", layers=-1,
                      device=args.device, num_workers=4)}
            results["head_training"] = r1
            for k, v in r1.items():
                log(f"  {k}: {v['clips_per_s']} clips/s ({v['clips']} Train clips × {v['epochs']} epochs, "
                    f"preloaded={v['preloaded']}, loader workers {v['num_workers']}, features {v['feature_mb']} MB)")

        if "e2e" in sections:
            log("2. end-to-end wavlm-large training steps (random weights) on the same Train clips")
            e2e = e2e_throughput(work, corpus, train_names, steps=args.e2e_steps, batch=args.e2e_batch,
                                 device=args.device)
            if r1:
                e2e["ratio_head_over_e2e"] = round(r1["wavlm_large_shaped"]["clips_per_s"] / e2e["clips_per_s"], 1)
            results["end_to_end"] = e2e
            log(f"  wavlm-large end-to-end: {e2e['clips_per_s']} clips/s ({e2e['seconds_per_step']} s per step of "
                f"{e2e['batch']} clips)" + (f"; head on WavLM-large-shaped cache is {e2e['ratio_head_over_e2e']}× "
                                            f"faster" if r1 else ""))

        if "ratio" in sections:
            log(f"2b. head epoch / end-to-end step per clip, in turn, {args.ratio_repeats} times")
            ratio = head_vs_e2e(work, large, corpus, train_names, [dcache.num_frames(n) for n in train_names],
                                repeats=args.ratio_repeats, batch=args.e2e_batch, device=args.device)
            results["head_over_e2e"] = ratio
            log(f"  ratio head epoch / end-to-end step per clip: min {ratio['ratio_min']}×, "
                f"median {ratio['ratio_median']}× (of {ratio['ratios']})")

        if "read" in sections:
            log("3. cache read throughput")
            results["read_throughput"] = {"wavlm_large_shaped": read_throughput(large),
                                          "demo_cache": read_throughput(demo)}
            for k, v in results["read_throughput"].items():
                for state in ("cold", "warm"):
                    s = v[state]
                    log(f"  {k} ({v['shard_bytes_mb']} MB of shards) {state}: FeatureCache "
                        f"{s['featurecache_mb_s']} MB/s, plain sequential read {s['plain_read_mb_s']} MB/s "
                        f"(ratio {s['ratio']})")

        if "rss" in sections:
            log("4. peak RSS of train-head (subprocess, streaming)")
            small_n, big_n = args.rss_clips
            rss = {"import_only_mb": import_rss()}
            log(f"  importing train-head alone: peak RSS {rss['import_only_mb']} MB")
            for label, n in (("small", small_n), ("large", big_n)):
                path = work / f"rss-{label}"
                if not (path / "manifest.json").is_file():
                    reps = (n + len(frames) - 1) // len(frames)
                    write_synthetic_cache(path, dim=1024, stored_layers=(24,), all_layers=25,
                                          num_frames=(frames * reps)[:n], seed=1, clips_per_shard=256, signal=0.3)
                rss[label] = {"clips": n, "cache_mb": cache_mb(path),
                              **peak_rss(path, work / "runs" / f"rss-{label}", preload="no", device=args.device)}
                log(f"  {label}: cache {rss[label]['cache_mb']} MB → peak RSS {rss[label]['peak_rss_mb']} MB "
                    f"(streaming)")
            rss["large_preloaded"] = {"clips": big_n, "cache_mb": rss["large"]["cache_mb"],
                                      **peak_rss(work / "rss-large", work / "runs" / "rss-large-p", preload="yes",
                                                device=args.device)}
            log(f"  large, --preload yes: peak RSS {rss['large_preloaded']['peak_rss_mb']} MB (for contrast)")
            results["peak_rss"] = rss

        if "grid" in sections:
            log(f"5. train-grid --preset table2 against five train-head runs ({args.grid_clips} clips, "
                f"{args.grid_epochs} epochs each)")
            g = grid_vs_single(work, clips=args.grid_clips, epochs=args.grid_epochs, device=args.device,
                               repeats=args.grid_repeats)
            log(f"  passes {g['passes']}; train-grid / five train-head runs: min {g['ratio_min']}, median "
                f"{g['ratio_median']} (of {g['ratios']}); grid predictions bitwise equal to the single runs': "
                f"{g['predictions_bitwise_equal']}")
            g["gpu_projection"] = gpu_projection(Path(__file__).resolve().parent / "results" / "heads_cuda.json",
                                                 head_speedup=args.head_speedup)
            p = g["gpu_projection"]
            if "ratio" in p:
                log(f"  PROJECTION (not measured) of the paper's grid per upstream on one H100 ({p['runs']} runs, "
                    f"{p['passes']} passes, 40 epochs): {p['hours_one_run_at_a_time']} h one run at a time → "
                    f"{p['hours_one_pass_per_group']} h one pass per group (reading overlapped with the GPU: "
                    f"{p['overlapped_hours_one_run_at_a_time']} h → {p['overlapped_hours_one_pass_per_group']} h)")
            results["grid"] = g
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
