"""Benchmark of the feature cache's read path (cache format 2), against plain reads of the same bytes.

    python bench/bench_cache.py [--clips 1000] [--repeats 9] [--workdir DIR] [--json OUT]

On a synthetic cache shaped like WavLM-large frames (≈300 frames × 1024 dims, float16,
four stored layers; written through the CacheWriter by ``write_synthetic_cache``), with
the shard files in the page cache (the usual case when training many heads from one
cache), it times per-clip reads in a shuffled order (training order):

* ``FeatureCache.frames(name, layer=k, dtype=None)`` (one layer) and
  ``FeatureCache.frames(name, dtype=None)`` (four layers) as train-head reads them after
  its first epoch: a reader checks a clip's CRC-32 on its first read only (``ratio``);
* the same with ``verify="always"``: every read checked, the cost of a first read
  (``ratio_first_read``);
* the same with ``verify=False`` (no CRC-32), to isolate the checksum's cost;
* a plain ``readinto`` of exactly the same byte ranges into a fresh numpy array (one
  range per layer; file objects opened once, offsets computed beforehand): the floor.

Each repetition times every variant over all clips, back to back, in alternating order;
the ratios (plain time / FeatureCache time, 1.0 = as fast as plain reads; the goal is
>= 0.9) are taken inside each repetition and reported as min and median over the
repetitions, because this machine is shared and noisy. It also times whole shards read
with ``iter_frames`` (one read per layer), the CRC-32 alone (the implementation in use,
and zlib's) and prints the projected MSP-Podcast cache size per stored layer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

#: MSP-Podcast (release 1.11): Train + Development + Test clips, mean frames after 8 s truncation at 50 Hz.
MSP_CLIPS, MSP_FRAMES, WAVLM_LARGE_DIM, WAVLM_LARGE_STATES = 87_800, 300, 1024, 25


def log(msg: str) -> None:
    print(msg, flush=True)


def build(work: Path, clips: int, frames, dim: int, layers: int, shard_size: int) -> Path:
    from conilium.testing import write_synthetic_cache

    path = work / f"cache-{clips}x{dim}x{layers}"
    marker = path / "manifest.json"
    if marker.is_file():
        try:
            from conilium.cache import FeatureCache

            FeatureCache(path)
            return path
        except Exception:  # another format or damaged: build it again
            pass
    t = time.perf_counter()
    write_synthetic_cache(path, clips=clips, dim=dim, stored_layers=tuple(range(layers)), all_layers=layers,
                          frames=frames, clips_per_shard=shard_size, seed=0)
    log(f"built {path} in {time.perf_counter() - t:.0f} s")
    return path


class PlainReader:
    """The floor: ``readinto`` of a clip's byte ranges (offsets computed beforehand)."""

    def __init__(self, cache):
        self.files = {}
        self.where = {}
        for name in cache.names:
            s = cache.shard_of(name)
            index = cache.shard_index(s)
            i = index.position[name]
            if s not in self.files:
                self.files[s] = open(index.path, "rb", buffering=0)
            t = int(index.num_frames[i])
            offsets = [index.layer_offset(k, int(index.offsets[i])) for k in range(index.num_layers)]
            self.where[name] = (self.files[s], offsets, t, index.dim, index.dtype)

    def read(self, name: str, layer=None) -> np.ndarray:
        f, offsets, t, dim, dtype = self.where[name]
        if layer is not None:
            out = np.empty((t, dim), dtype)
            f.seek(offsets[layer])
            f.readinto(out)
            return out
        out = np.empty((len(offsets), t, dim), dtype)
        for k, off in enumerate(offsets):
            f.seek(off)
            f.readinto(out[k])
        return out

    def close(self):
        for f in self.files.values():
            f.close()


def _time(fn, names) -> float:
    t = time.perf_counter()
    for n in names:
        fn(n)
    return time.perf_counter() - t


def per_clip(cache_dir: Path, repeats: int, layer: int) -> dict:
    from conilium.cache import FeatureCache

    checked = FeatureCache(cache_dir)  # checks each clip once: every read after the warm-up is unchecked
    always = FeatureCache(cache_dir, verify="always")  # what a first read costs
    unchecked = FeatureCache(cache_dir, verify=False)
    plain = PlainReader(checked)
    names = list(checked.names)
    np.random.default_rng(0).shuffle(names)
    variants = {
        "one_layer": {
            "plain": lambda n: plain.read(n, layer),
            "featurecache": lambda n: checked.frames(n, layer=layer, dtype=None),
            "featurecache_first_read": lambda n: always.frames(n, layer=layer, dtype=None),
            "featurecache_no_crc": lambda n: unchecked.frames(n, layer=layer, dtype=None),
        },
        "four_layers": {
            "plain": lambda n: plain.read(n),
            "featurecache": lambda n: checked.frames(n, dtype=None),
            "featurecache_first_read": lambda n: always.frames(n, dtype=None),
            "featurecache_no_crc": lambda n: unchecked.frames(n, dtype=None),
        },
    }
    for fns in variants.values():  # warm the page cache and the shard indices
        for fn in fns.values():
            _time(fn, names)
    out = {}
    for key, fns in variants.items():
        times = {k: [] for k in fns}
        for r in range(repeats):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                times[k].append(_time(fns[k], names))
        ratio = [p / f for p, f in zip(times["plain"], times["featurecache"])]
        ratio_first = [p / f for p, f in zip(times["plain"], times["featurecache_first_read"])]
        ratio_no_crc = [p / f for p, f in zip(times["plain"], times["featurecache_no_crc"])]
        crc_us = [(f - g) / len(names) * 1e6
                  for f, g in zip(times["featurecache_first_read"], times["featurecache_no_crc"])]
        nbytes = plain.read(names[0], layer if key == "one_layer" else None).nbytes / checked.num_frames(names[0])
        mean_bytes = nbytes * float(np.mean([checked.num_frames(n) for n in names]))
        out[key] = {
            "clips": len(names),
            "bytes_per_clip": int(mean_bytes),
            "us_per_clip_median": {k: round(statistics.median(v) / len(names) * 1e6, 1) for k, v in times.items()},
            "ratio_min": round(min(ratio), 3), "ratio_median": round(statistics.median(ratio), 3),
            "ratio_first_read_min": round(min(ratio_first), 3),
            "ratio_first_read_median": round(statistics.median(ratio_first), 3),
            "ratio_no_crc_min": round(min(ratio_no_crc), 3),
            "ratio_no_crc_median": round(statistics.median(ratio_no_crc), 3),
            "crc_us_per_clip_median": round(statistics.median(crc_us), 1),
        }
    plain.close()
    checked.close()
    always.close()
    unchecked.close()
    return out


def whole_shards(cache_dir: Path, repeats: int) -> dict:
    """Every clip of every shard through iter_frames (one read per layer and shard) against plain
    readinto of each shard's frames, layer by layer."""
    from conilium.cache import FeatureCache

    cache = FeatureCache(cache_dir)
    shards = len(cache.manifest["shards"])
    regions = []
    for s in range(shards):
        index = cache.shard_index(s)
        regions += [(index.path, index.layer_offset(k, 0), index.total_frames, index.dim, index.dtype)
                    for k in range(index.num_layers)]

    def plain():
        n = 0
        for path, off, t, dim, dtype in regions:
            with open(path, "rb", buffering=0) as f:
                buf = np.empty((t, dim), dtype)
                f.seek(off)
                n += f.readinto(buf)
        return n

    def via():
        n = 0
        for s in range(shards):
            for _, x in cache.iter_frames(cache.shard_names(s), dtype=None):
                n += x.nbytes
        return n

    plain(), via()
    ratios, t_via = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        nbytes = plain()
        t1 = time.perf_counter()
        via()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        t_via.append(t2 - t1)
    cache.close()
    return {"bytes": nbytes, "featurecache_gb_s_median": round(nbytes / statistics.median(t_via) / 1e9, 2),
            "ratio_min": round(min(ratios), 3), "ratio_median": round(statistics.median(ratios), 3)}


def crc_speed(nbytes: int) -> dict:
    from conilium.cache.shards import CRC_IMPLEMENTATION, crc32

    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    out = {"implementation": CRC_IMPLEMENTATION}
    for label, fn in (("in_use", crc32), ("zlib", zlib.crc32)):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(200):
                fn(data)
            best = min(best, (time.perf_counter() - t) / 200)
        out[label] = {"us_per_clip_layer": round(best * 1e6, 1), "gb_s": round(nbytes / best / 1e9, 2)}
    return out


def projection(cache_dir: Path) -> dict:
    from conilium.cache import FeatureCache

    cache = FeatureCache(cache_dir)
    frames = sum(cache.num_frames(n) for n in cache.names)
    layers = len(cache.layers)
    files = sum(s["bytes"] for s in cache.manifest["shards"])
    pooled = len(cache) * layers * 2 * cache.dim * 4
    overhead = (files - pooled - frames * layers * cache.dim * 2) / len(cache)  # index, names, HDF5 headers
    per_layer = MSP_CLIPS * MSP_FRAMES * WAVLM_LARGE_DIM * 2
    return {"clips": MSP_CLIPS, "frames_per_clip": MSP_FRAMES, "dim": WAVLM_LARGE_DIM, "dtype": "float16",
            "gb_per_stored_layer": round(per_layer / 1e9, 1), "gib_per_stored_layer": round(per_layer / 2 ** 30, 1),
            "gb_all_25_hidden_states": round(per_layer * WAVLM_LARGE_STATES / 1e9),
            "measured_overhead_bytes_per_clip": round(overhead)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=1000)
    ap.add_argument("--frames", type=int, nargs=2, default=(280, 320), help="frame counts drawn in this range")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4, help="stored layers")
    ap.add_argument("--shard-size", type=int, default=256, help="clips per shard (extract-features' default)")
    ap.add_argument("--layer", type=int, default=3, help="stored-layer position of the one-layer reads")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--workdir", type=Path, help="where to build the cache (kept, reused); default: a temp dir")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cache_dir = build(work, args.clips, tuple(args.frames), args.dim, args.layers, args.shard_size)
        figs = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "python": platform.python_version()},
                "cache": {"clips": args.clips, "frames": list(args.frames), "dim": args.dim, "layers": args.layers,
                          "dtype": "float16", "shard_size": args.shard_size, "repeats": args.repeats,
                          "page_cache": "warm"}}
        figs["per_clip"] = per_clip(cache_dir, args.repeats, args.layer)
        figs["whole_shards"] = whole_shards(cache_dir, max(3, args.repeats // 3))
        figs["crc32"] = crc_speed(figs["per_clip"]["one_layer"]["bytes_per_clip"])
        figs["msp_podcast_projection"] = projection(cache_dir)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    for key in ("one_layer", "four_layers"):
        p = figs["per_clip"][key]
        us = p["us_per_clip_median"]
        log(f"{key.replace('_', ' ')} ({p['bytes_per_clip'] / 1e3:.0f} kB a clip, {p['clips']} clips, "
            f"{args.repeats} repetitions): plain readinto {us['plain']} us, FeatureCache {us['featurecache']} us "
            f"after a clip's first read, {us['featurecache_first_read']} us on a first read (CRC-32 checked), "
            f"{us['featurecache_no_crc']} us without CRC-32)")
        log(f"  ratio plain/FeatureCache: min {p['ratio_min']}, median {p['ratio_median']} (epochs after the "
            f"first); first read: min {p['ratio_first_read_min']}, median {p['ratio_first_read_median']}; "
            f"without CRC-32: min {p['ratio_no_crc_min']}, median {p['ratio_no_crc_median']}; CRC-32 cost "
            f"{p['crc_us_per_clip_median']} us a clip")
    w = figs["whole_shards"]
    log(f"whole shards (iter_frames): {w['featurecache_gb_s_median']} GB/s; ratio plain/FeatureCache min "
        f"{w['ratio_min']}, median {w['ratio_median']}")
    c = figs["crc32"]
    log(f"CRC-32 of one clip's layer: {c['in_use']['us_per_clip_layer']} us ({c['in_use']['gb_s']} GB/s, "
        f"{c['implementation']}); zlib {c['zlib']['us_per_clip_layer']} us ({c['zlib']['gb_s']} GB/s)")
    m = figs["msp_podcast_projection"]
    log(f"MSP-Podcast projection: {m['clips']:,} clips × {m['frames_per_clip']} frames × {m['dim']} × 2 bytes = "
        f"{m['gb_per_stored_layer']} GB ({m['gib_per_stored_layer']} GiB) per stored layer, "
        f"{m['gb_all_25_hidden_states']} GB for all 25 hidden states of WavLM-large "
        f"(+ {m['measured_overhead_bytes_per_clip']} bytes a clip of index and headers, measured)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
