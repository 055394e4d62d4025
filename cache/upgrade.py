"""Converting a feature cache of format 1 to format 2, in place, frames unchanged.

Format 1 stored one HDF5 dataset per clip (``frames/<clip>``, chunked one layer per chunk,
and ``pooled/<clip>``); format 2 stores each layer's frames contiguously with a per-clip
index and CRC-32s (:mod:`conilium.cache.shards`). :func:`upgrade_cache` rewrites every
shard through the :class:`~conilium.cache.writer.CacheWriter` (the same bytes a fresh
extraction would write), then the sidecars, extraction.json, clips.json and, last, the
manifest. It reads every shard once and needs free space for one shard at a time. An
interrupted upgrade is resumed by running it again (shards already converted are kept).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import h5py
from tqdm import tqdm

from conilium.errors import CacheError
from conilium.util import read_json, write_json

from conilium.dirs import CacheDir, file_sha256

from .reader import load_manifest, read_clips
from .shards import FORMAT_VERSION
from .writer import MANIFEST_FIELDS, SETTINGS, CacheWriter


def _format1_items(path: Path, pooled: bool):
    """``(name, frames, pooled)`` of a format-1 shard, as stored (float16 or float32)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != 1:
                raise CacheError(f"{path}: shard of format {f.attrs.get('format')!r}, expected format 1")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]]
            for name in names:
                frames = f["frames"][name][()]
                stats = f["pooled"][name][()] if pooled else None
                yield name, frames, stats
    except (OSError, KeyError) as e:
        raise CacheError(f"{path}: unreadable format-1 shard ({e}); rebuild the cache: rerun extract-features "
                         f"with the same options and --overwrite") from None


def upgrade_cache(path, *, verbose: bool = False) -> dict:
    """Convert the format-1 cache ``path`` to format 2 in place; returns the new manifest.

    The frames (float16 or float32) and pooled statistics are copied unchanged; clips.json
    keeps its content. A cache already of format 2 is checked and returned as it is. A
    damaged format-1 cache (a shard or clips.json that differs from the manifest's
    checksum) is a :class:`CacheError`: rebuild it with extract-features --overwrite.
    """
    path = Path(path)
    mpath = CacheDir(path).manifest_path
    if not mpath.is_file():
        load_manifest(path)  # says what the directory is, or that the cache is incomplete
    try:
        manifest = read_json(mpath)
    except ValueError as e:
        raise CacheError(f"{mpath}: corrupt manifest ({e}); rebuild the cache with extract-features --overwrite") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == FORMAT_VERSION:
        return load_manifest(path)
    if fmt != 1:
        raise CacheError(f"{mpath}: cache format {fmt!r}; only format 1 can be upgraded (to {FORMAT_VERSION})")
    if not manifest.get("complete"):
        raise CacheError(f"{path}: the format-1 cache is incomplete; rebuild it with extract-features --overwrite")
    records = read_clips(path, manifest)
    spath = path / SETTINGS
    source = read_json(spath) if spath.is_file() else {k: v for k, v in manifest.items() if k not in MANIFEST_FIELDS}
    settings = {"format": FORMAT_VERSION, **{k: v for k, v in source.items() if k != "format"}}
    members: Dict[int, List[str]] = {}
    for r in records:
        members.setdefault(int(r["shard"]), []).append(r["name"])
    pooled = bool(settings.get("pooled_stats"))
    entries = []
    with CacheWriter(path) as writer:
        writer.use_settings(settings)
        for index, entry in enumerate(tqdm(manifest["shards"], desc="upgrading shards", unit="shard",
                                           disable=not verbose, file=sys.stderr)):
            side = writer.sidecar_path(index)
            try:
                old = read_json(side) if side.is_file() else {}
            except ValueError:
                old = {}
            skipped = [list(s) for s in old.get("skipped", [])]
            planned = members.get(index, []) + [n for n, _ in skipped]
            rec = writer.valid_shard(index, planned)  # converted by an interrupted run of this function
            if rec is None:
                shard = path / entry["file"]
                if not shard.is_file() or file_sha256(shard) != entry["sha256"]:
                    raise CacheError(f"{shard}: missing or damaged (its SHA-256 differs from the manifest's); "
                                     f"rebuild the cache: rerun extract-features with the same options and --overwrite")
                rec = writer.write_shard(index, _format1_items(shard, pooled), skipped=skipped)
            entries.append(rec["entry"])
        write_json(spath, settings)
        skipped = {s["clip"]: s["reason"] for s in manifest.get("skipped", [])}
        writer.finish(records, shards=entries, skipped=skipped)
    return load_manifest(path)
