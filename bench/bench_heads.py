"""Benchmark of stage 2 (train-head): prints measured figures, optionally writes them as JSON.

    python bench/bench_heads.py [--json OUT] [--workdir DIR] [--e2e-steps 3] [--skip-e2e]

In one run, on this machine:

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
   WavLM-large-shaped caches of different sizes, and preloading the larger one for contrast.

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


def e2e_throughput(work: Path, corpus: Path, names, *, steps: int, batch: int, device: str = "cpu") -> dict:
    """Training steps of wavlm-large (random weights) + attentive head on raw audio of ``names``."""
    import torch

    from conilium.audio import read_audio
    from conilium.corpus import load_corpus
    from conilium.extract.upstreams import load_upstream
    from conilium.heads.losses import loss_fn
    from conilium.heads.model import EmotionHead, HeadConfig

    t_load = time.perf_counter()
    upstream, _ = load_upstream("wavlm-large", random_init=True, seed=0, random_root=work / "upstreams")
    load_s = time.perf_counter() - t_load
    dev = torch.device(device)
    upstream.to(dev).train()
    head = EmotionHead(HeadConfig(dim=upstream.config.hidden_size, num_layers=1, layers=0)).to(dev)
    params = list(upstream.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    corpus_ = load_corpus(corpus, read_durations=False)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(names))
    times, n_params = [], sum(p.numel() for p in upstream.parameters())
    for step in range(steps + 1):  # the first step warms up and is not counted
        idx = order[(step * batch) % len(names):][:batch]
        waves = [read_audio(corpus_.audio_path(names[i]), max_seconds=8.0) for i in idx]
        t0 = time.perf_counter()
        n = max(len(w) for w in waves)
        x = torch.zeros(len(waves), n)
        mask = torch.zeros(len(waves), n, dtype=torch.long)
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        x, mask = x.to(dev), mask.to(dev)
        hs = upstream(x, attention_mask=mask).last_hidden_state  # (B, T, D)
        lengths = upstream._get_feat_extract_output_lengths(mask.sum(1)).clamp(max=hs.shape[1])
        logits = head(hs.unsqueeze(2), lengths)
        y = torch.full((len(waves), 8), 1 / 8, device=dev)
        loss = loss_fn("wbce")(logits, y, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > 0:
            times.append(dt)
        log(f"  e2e step {step}{' (warm-up)' if step == 0 else ''}: {dt:.1f} s for {len(waves)} clips")
    return {"upstream_params_M": round(n_params / 1e6, 1), "batch": batch, "steps_timed": steps,
            "seconds_per_step": round(float(np.mean(times)), 2),
            "clips_per_s": round(batch / float(np.mean(times)), 3), "load_s": round(load_s, 1)}


def _drop_cache(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_throughput(cache_dir: Path) -> dict:
    from conilium.cache.store import FeatureCache

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--workdir", type=Path, help="where to build corpora and caches (kept); default: a temp dir")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the head throughput runs")
    ap.add_argument("--e2e-steps", type=int, default=3, help="timed end-to-end steps (after one warm-up step)")
    ap.add_argument("--e2e-batch", type=int, default=2)
    ap.add_argument("--skip-e2e", action="store_true", help="skip the wavlm-large end-to-end steps")
    ap.add_argument("--device", default="cpu", help="torch device of the training runs (cpu, cuda)")
    ap.add_argument("--rss-clips", type=int, nargs=2, default=(300, 3000),
                    help="clips of the small and large WavLM-large-shaped caches for the peak-RSS runs")
    args = ap.parse_args(argv)

    import torch

    from conilium.cache.store import FeatureCache
    from conilium.heads.data import write_synthetic_cache

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
        log("building a WavLM-large-shaped cache (1024-dim last layer) with the demo clips' frame counts …")
        large = work / "wavlm-large-shaped"
        if not (large / "manifest.json").is_file():
            write_synthetic_cache(large, dim=1024, stored_layers=(24,), all_layers=25, num_frames=frames, seed=0,
                                  clips_per_shard=256, signal=0.3)

        log("1. head training throughput (median epoch after the first)")
        head_throughput(demo, work / "runs" / "warm-up", epochs=1, preload="auto", device=args.device)
        r1 = {"demo_cache": head_throughput(demo, work / "runs" / "demo", epochs=args.epochs, preload="auto",
                                             device=args.device),
              "demo_cache_streamed": head_throughput(demo, work / "runs" / "demo-s", epochs=args.epochs, preload="no",
                                                     device=args.device),
              "wavlm_large_shaped": head_throughput(large, work / "runs" / "large", epochs=args.epochs,
                                                    preload="auto", layers=-1, device=args.device),
              "wavlm_large_shaped_streamed": head_throughput(large, work / "runs" / "large-s", epochs=args.epochs,
                                                             preload="no", layers=-1, device=args.device),
              "wavlm_large_shaped_streamed_4_workers": head_throughput(
                  large, work / "runs" / "large-s4", epochs=args.epochs, preload="no", layers=-1, device=args.device,
                  num_workers=4)}
        results["head_training"] = r1
        for k, v in r1.items():
            log(f"  {k}: {v['clips_per_s']} clips/s ({v['clips']} Train clips × {v['epochs']} epochs, "
                f"preloaded={v['preloaded']}, loader workers {v['num_workers']}, features {v['feature_mb']} MB)")

        if not args.skip_e2e:
            log("2. end-to-end wavlm-large training steps (random weights) on the same Train clips")
            corpus = Path(dcache.manifest["corpus_root"])
            e2e = e2e_throughput(work, corpus, train_names, steps=args.e2e_steps, batch=args.e2e_batch,
                                 device=args.device)
            e2e["ratio_head_over_e2e"] = round(r1["wavlm_large_shaped"]["clips_per_s"] / e2e["clips_per_s"], 1)
            results["end_to_end"] = e2e
            log(f"  wavlm-large end-to-end: {e2e['clips_per_s']} clips/s ({e2e['seconds_per_step']} s per step of "
                f"{e2e['batch']} clips); head on WavLM-large-shaped cache is {e2e['ratio_head_over_e2e']}× faster")

        log("3. cache read throughput")
        results["read_throughput"] = {"wavlm_large_shaped": read_throughput(large), "demo_cache": read_throughput(demo)}
        for k, v in results["read_throughput"].items():
            for state in ("cold", "warm"):
                s = v[state]
                log(f"  {k} ({v['shard_bytes_mb']} MB of shards) {state}: FeatureCache {s['featurecache_mb_s']} MB/s, "
                    f"plain sequential read {s['plain_read_mb_s']} MB/s (ratio {s['ratio']})")

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
            log(f"  {label}: cache {rss[label]['cache_mb']} MB → peak RSS {rss[label]['peak_rss_mb']} MB (streaming)")
        rss["large_preloaded"] = {"clips": big_n, "cache_mb": rss["large"]["cache_mb"],
                                  **peak_rss(work / "rss-large", work / "runs" / "rss-large-p", preload="yes",
                                            device=args.device)}
        log(f"  large, --preload yes: peak RSS {rss['large_preloaded']['peak_rss_mb']} MB (for contrast)")
        results["peak_rss"] = rss
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
