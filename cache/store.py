"""The on-disk feature cache: HDF5 shards, ``clips.json`` and ``manifest.json``.

Layout of a cache directory::

    manifest.json        settings, upstream identity, corpus fingerprint, normalisation
                         statistics, skipped clips, shards + checksums (written last)
    extraction.json      the same settings, written when extraction starts
    clips.json           every clip's metadata and annotations, its shard and frame count
                         (noise-augmented copies ``<FileName>#aug<k>`` add "source" and
                         "augmentation")
    upstream/            the upstream's weights when they were made here (--random-init)
    shards/shard-00000.h5 …
    shards/shard-00000.json  sidecar of a finished shard (its clips, checksum, settings key)

Hidden-state indices (``manifest["layers"]``): 0 is the input of the first transformer
layer (projected CNN features plus positional convolution), ``i`` the output of layer
``i``, and the last one the model's ``last_hidden_state``.

Each shard holds a few hundred clips. ``frames/<clip>`` is a (frames, layers, dim)
dataset of float16 (or float32), chunked one layer per chunk when several layers are
stored, so that reading a clip, or one layer of a clip, reads little more than its own
bytes. ``pooled/<clip>`` (optional) is a (all layers, 2, dim) float32 array of per-layer
mean and std over frames. Shards are written under a temporary name and renamed when
complete; ``manifest.json`` is written last, with ``"complete": true``. Caches are written
through :class:`conilium.cache.writer.CacheWriter` (extract-features and synthetic test caches alike).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import h5py
import numpy as np

from conilium.corpus import Clip
from conilium.errors import CacheError
from conilium.util import atomic_path, read_json, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CLIPS = "clips.json"
SHARD_DIR = "shards"


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.h5"


def file_sha256(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def to_float16(frames: np.ndarray, clip: str) -> np.ndarray:
    """Cast to float16, refusing values float16 cannot hold (no silent infinities)."""
    finfo = np.finfo(np.float16)
    if not np.all(np.isfinite(frames)):
        raise CacheError(f"clip {clip}: upstream output holds NaN or inf")
    peak = float(np.abs(frames).max()) if frames.size else 0.0
    if peak > float(finfo.max):
        raise CacheError(f"clip {clip}: feature value {peak:.4g} exceeds float16's range "
                         f"(±{float(finfo.max):.0f}); extract with --dtype float32")
    return frames.astype(np.float16)


def write_shard(path, items: Iterable[Tuple[str, np.ndarray, Optional[np.ndarray]]], *,
                dtype: str = "float16", shard_index: int = 0) -> dict:
    """Write one shard atomically from ``(name, frames (T, L, D), pooled (L_all, 2, D) or None)``.

    Returns the manifest entry ``{"file", "clips", "sha256", "bytes"}`` (``file`` relative
    to the cache directory when ``path`` lies in its ``shards/`` folder).
    """
    path = Path(path)
    names: List[str] = []
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs["format"] = FORMAT_VERSION
            f.attrs["shard_index"] = shard_index
            g = f.create_group("frames")
            gp = None
            for name, frames, pooled in items:
                if frames.ndim != 3:
                    raise CacheError(f"clip {name}: frames must be (frames, layers, dim), got {frames.shape}")
                arr = to_float16(frames, name) if dtype == "float16" else frames.astype(np.float32)
                t, nl, d = arr.shape
                chunks = (t, 1, d) if nl > 1 and t > 0 else None
                g.create_dataset(name, data=arr, chunks=chunks, track_times=False)
                if pooled is not None:
                    if gp is None:
                        gp = f.create_group("pooled")
                    gp.create_dataset(name, data=pooled.astype(np.float32), track_times=False)
                names.append(name)
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype(),
                             track_times=False)
    rel = f"{SHARD_DIR}/{path.name}" if path.parent.name == SHARD_DIR else str(path)
    return {"file": rel, "clips": len(names), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def load_manifest(path) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CacheError(f"{path}: cache directory not found (build it with extract-features)")
    if not mpath.is_file():
        raise CacheError(f"{path}: no {MANIFEST}: the cache is incomplete (extraction did not finish); "
                         f"rerun extract-features with the same options to resume it")
    try:
        manifest = read_json(mpath)
    except ValueError as e:
        raise CacheError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(f"{mpath}: cache format {manifest.get('format')!r}, this conilium reads "
                         f"format {FORMAT_VERSION}; rebuild the cache")
    if not manifest.get("complete"):
        raise CacheError(f"{path}: the cache is incomplete (extraction did not finish); "
                         f"rerun extract-features with the same options to resume it")
    return manifest


class FeatureCache:
    """Read access to a feature cache directory.

    >>> cache = FeatureCache("cache/wavlm-large")
    >>> cache.names[:2], cache.manifest["dim"]
    >>> x = cache.frames(cache.names[0])      # float32 (frames, layers, dim)

    File handles are opened lazily and per process (safe with DataLoader workers);
    at most ``max_open`` shards stay open at once.
    """

    def __init__(self, path, *, max_open: int = 16):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        cpath = self.path / CLIPS
        if not cpath.is_file():
            raise CacheError(f"{self.path}: {CLIPS} missing: the cache is incomplete; rerun extract-features")
        records = read_json(cpath)
        self.clips: Dict[str, Clip] = OrderedDict()
        self._where: Dict[str, Tuple[int, int]] = {}
        self._source: Dict[str, str] = {}
        for r in records:
            self.clips[r["name"]] = Clip.from_json(r)
            self._where[r["name"]] = (int(r["shard"]), int(r["num_frames"]))
            if r.get("source"):
                self._source[r["name"]] = r["source"]
        self.names: List[str] = list(self.clips)
        self._shards = [self.path / s["file"] for s in self.manifest["shards"]]
        missing = [str(p) for p in self._shards if not p.is_file()]
        if missing:
            raise CacheError(f"{self.path}: shard file(s) missing: {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''}; run verify-cache, then extract-features to repair")
        self.max_open = max_open
        self._open: "OrderedDict[int, h5py.File]" = OrderedDict()
        self._pid = os.getpid()

    # ---- metadata -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.clips

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def layers(self) -> List[int]:
        """Indices (into the upstream's hidden states, 0 = CNN output) of the stored layers."""
        return list(self.manifest["layers"])

    @property
    def has_pooled(self) -> bool:
        return bool(self.manifest.get("pooled_stats"))

    @property
    def has_annotations(self) -> bool:
        return any(c.annotations for c in self.clips.values())

    @property
    def splits(self) -> List[str]:
        seen: List[str] = []
        for c in self.clips.values():
            if c.split not in seen:
                seen.append(c.split)
        return seen

    def split(self, split: str, *, augmented: bool = True) -> List[str]:
        """Clip names of ``split``; ``augmented=False`` leaves out noise-augmented copies."""
        return [n for n, c in self.clips.items() if c.split == split and (augmented or n not in self._source)]

    def source(self, name: str) -> str:
        """The original clip of a noise-augmented copy (``<FileName>#aug<k>``); ``name`` itself otherwise."""
        if name not in self.clips:
            raise KeyError(f"clip {name} is not in cache {self.path}")
        return self._source.get(name, name)

    def is_augmented(self, name: str) -> bool:
        return name in self._source

    def num_frames(self, name: str) -> int:
        return self._where[name][1]

    def shard_of(self, name: str) -> int:
        return self._where[name][0]

    # ---- data -----------------------------------------------------------------------
    def _file(self, index: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked worker: never share HDF5 handles across processes
            self._open = OrderedDict()
            self._pid = os.getpid()
        f = self._open.get(index)
        if f is None:
            try:
                f = h5py.File(self._shards[index], "r")
            except OSError as e:
                raise CacheError(f"{self._shards[index]}: cannot open shard ({e}); run verify-cache") from None
            self._open[index] = f
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                old.close()
        else:
            self._open.move_to_end(index)
        return f

    def _dataset(self, group: str, name: str):
        if name not in self._where:
            raise KeyError(f"clip {name} is not in cache {self.path}")
        f = self._file(self._where[name][0])
        try:
            return f[group][name]
        except KeyError:
            raise CacheError(f"{self._shards[self._where[name][0]]}: clip {name} missing from "
                             f"group {group}; run verify-cache") from None

    def frames(self, name: str, layer: Optional[int] = None, dtype=np.float32) -> np.ndarray:
        """Frames of one clip as (frames, layers, dim), or of one stored layer (position ``layer``,
        shape (frames, 1, dim)); ``dtype=None`` keeps the stored type (float16 or float32)."""
        ds = self._dataset("frames", name)
        x = ds[()] if layer is None else ds[:, layer : layer + 1, :]
        return x if dtype is None else x.astype(dtype, copy=False)

    def pooled(self, name: str) -> np.ndarray:
        """Per-layer mean and std over frames, (all layers, 2, dim) float32."""
        if not self.has_pooled:
            raise CacheError(f"{self.path}: cache has no pooled statistics (extract with --pooled-stats)")
        return self._dataset("pooled", name)[()]

    def iter_frames(self, names: Sequence[str]) -> Iterator[Tuple[str, np.ndarray]]:
        """Frames of ``names`` in the given order."""
        for n in names:
            yield n, self.frames(n)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def write_clips(path, records: List[dict]) -> None:
    write_json(Path(path) / CLIPS, records)


def write_manifest(path, manifest: dict) -> None:
    write_json(Path(path) / MANIFEST, manifest)
