"""A synthetic feature cache: random frames with a class signal, written as extract-features writes a cache."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

import conilium
from conilium.cache.reader import FeatureCache
from conilium.cache.writer import CacheWriter
from conilium.corpus import Annotation, Clip

#: Consensus classes of the synthetic clips and their prior (MSP-Podcast-like imbalance, a few O and X).
LETTERS = ["A", "S", "H", "U", "F", "D", "C", "N", "O", "X"]
PRIOR = np.array([0.08, 0.08, 0.22, 0.06, 0.05, 0.05, 0.08, 0.32, 0.03, 0.03])


def write_synthetic_cache(path, *, clips: int = 60, dim: int = 16, stored_layers: Sequence[int] = (1, 3),
                          all_layers: int = 4, frames: Tuple[int, int] = (20, 60), seed: int = 0,
                          dtype: str = "float16", annotations: bool = True, clips_per_shard: int = 100,
                          signal: float = 1.0, num_frames: Optional[Sequence[int]] = None,
                          augmented_copies: int = 0) -> FeatureCache:
    """Write a complete cache of random frames with a class signal, for benchmarks and tests.

    Clips get a consensus class (MSP-Podcast-like imbalance, a few O and X, among them
    the first four clips: O and X in Development and in Train), 5 simulated
    annotators agreeing with it most of the time (when ``annotations``), a split
    (Train 60 %, Development 25 %, Test3 15 %) and frames ~ N(signal · m_class, 1) with a
    random number of frames in ``frames`` (or ``num_frames[i]`` for clip i, when given, which
    also sets the number of clips). ``stored_layers`` are the upstream layers
    whose frames are stored (numbers below ``all_layers``); pooled statistics cover all
    ``all_layers`` layers (exact for the stored ones, drawn alike for the others). Written
    through :class:`conilium.cache.writer.CacheWriter`, exactly like extract-features writes a
    cache (the same manifest fields: upstream ``"synthetic"``, no corpus, no normalisation);
    a cache already at ``path`` is replaced.
    ``augmented_copies`` adds a noisy copy ``<name>#aug0`` (with ``"source"``, as
    extract-features --augment-noise writes them) of that many Train clips.
    """
    path = Path(path)
    if any(not 0 <= k < all_layers for k in stored_layers):
        raise ValueError(f"stored_layers {list(stored_layers)} must lie in 0..{all_layers - 1}")
    if num_frames is not None:
        clips = len(num_frames)
    config = {"synthetic": True, "clips": clips, "dim": dim, "stored_layers": list(stored_layers),
              "all_layers": all_layers, "frames": list(frames), "seed": seed, "dtype": dtype,
              "annotations": annotations, "clips_per_shard": clips_per_shard, "signal": signal,
              "augmented_copies": augmented_copies}
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(8, all_layers, dim)).astype(np.float32)
    splits = rng.choice(["Train", "Development", "Test3"], size=clips, p=[0.6, 0.25, 0.15])
    stored = list(stored_layers)
    records, items = [], []
    with CacheWriter(path) as cache:
        cache.begin(overwrite=True)
        cache.write_settings(_settings(config))
        for i in range(clips):
            clip, c = _clip(rng, i, splits, annotations)
            t = int(rng.integers(frames[0], frames[1] + 1))
            if num_frames is not None:
                t = int(num_frames[i])
            x, pooled = _features(rng, t, signal * means[c], stored)
            items.append((clip.name, x, pooled))
            rec = clip.to_json()
            rec.update(shard=len(cache.written), num_frames=t)
            records.append(rec)
            if augmented_copies > 0 and clip.split == "Train":
                augmented_copies -= 1
                noisy = x + rng.normal(scale=0.5, size=x.shape).astype(np.float32)
                items.append((f"{clip.name}#aug0", noisy, pooled))
                records.append(dict(rec, name=f"{clip.name}#aug0", source=clip.name, augmentation={"snr_db": 10.0}))
            if len(items) >= clips_per_shard:
                cache.write_shard(len(cache.written), items)
                items = []
        if items:
            cache.write_shard(len(cache.written), items)
        cache.finish(records)
    return FeatureCache(path)


def _settings(config: dict) -> dict:
    """extraction.json of a synthetic cache: extract-features' fields, ``config`` the call's arguments."""
    stored_layers = config["stored_layers"]
    return {
        "upstream": {"name": "synthetic", "source": "synthetic", "seed": config["seed"]},
        "layers": list(stored_layers),
        "layers_spec": ",".join(str(k) for k in stored_layers),
        "num_hidden_states": config["all_layers"],
        "dim": config["dim"],
        "dtype": config["dtype"],
        "compute_dtype": "float32",
        "frame_rate": 50.0,
        "max_seconds": None,
        "normalize": "none",
        "pooled_stats": True,
        "corpus_root": None,
        "corpus_fingerprint": None,
        "splits": None,
        "augmentation": ({"synthetic": True, "copies": 1, "clips": config["augmented_copies"]}
                         if config["augmented_copies"] else None),
        "shard_size": config["clips_per_shard"],
        "code_version": conilium.__version__,
        "config": config,
        "normalize_stats": None,
    }


def _clip(rng: np.random.Generator, i: int, splits: np.ndarray, annotations: bool) -> Tuple[Clip, int]:
    """Clip ``i`` (its split settled in ``splits``) and the index of the class whose signal its frames carry."""
    emo = str(rng.choice(LETTERS, p=PRIOR))
    if i < 4:  # always some O and X clips in Train and Development
        emo, splits[i] = ("O", "X")[i % 2], ("Development", "Train")[i // 2]
    c = LETTERS.index(emo) if emo in LETTERS[:8] else int(rng.integers(8))
    anns: List[Annotation] = []
    if annotations:
        for w in range(5):
            r = rng.random()
            primary = LETTERS[c] if r < 0.6 else ("Other" if r > 0.95 else LETTERS[int(rng.integers(8))])
            second = tuple({LETTERS[int(rng.integers(8))] for _ in range(int(rng.integers(0, 3)))})
            anns.append(Annotation(worker=f"W{w}", primary=primary, secondary=second))
    clip = Clip(name=f"SYN_{i:05d}.wav", split=str(splits[i]), emo_class=emo if splits[i] != "Test3" else None,
                speaker=str(int(rng.integers(20))), gender="Female" if i % 2 else "Male",
                duration=1.0, annotations=tuple(anns))
    return clip, c


def _features(rng: np.random.Generator, t: int, class_mean: np.ndarray,
              stored: List[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``t`` frames of the stored layers around ``class_mean`` (all layers, dim) and every layer's
    pooled statistics (all layers, 2, dim): exact for the stored layers, drawn alike for the others."""
    x = rng.normal(size=(t, len(stored), class_mean.shape[1])).astype(np.float32) + class_mean[stored][None]
    mean = class_mean + rng.normal(size=class_mean.shape).astype(np.float32) / np.sqrt(t)
    std = 1.0 + 0.05 * rng.standard_normal(class_mean.shape).astype(np.float32)
    mean[stored], std[stored] = x.mean(axis=0), x.std(axis=0)
    return x, np.stack([mean, std], axis=1)
