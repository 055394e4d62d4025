"""verify-cache: check every shard of a feature cache against its manifest."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import h5py
from tqdm import tqdm

from conilium.cache.store import CLIPS, file_sha256, load_manifest
from conilium.errors import CacheError
from conilium.util import read_json


@dataclass
class VerifyReport:
    shards: int = 0
    clips: int = 0
    bytes: int = 0
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path, *, checksums: bool = True, verbose: bool = False) -> VerifyReport:
    """Check ``path``'s manifest, clips.json and every shard (size, SHA-256, clips, frames).

    Raises :class:`CacheError` when the manifest itself is missing or incomplete;
    returns a :class:`VerifyReport` whose ``problems`` list everything else found wrong.
    """
    path = Path(path)
    manifest = load_manifest(path)
    report = VerifyReport(shards=len(manifest.get("shards", [])))
    cpath = path / CLIPS
    if not cpath.is_file():
        report.problems.append(f"{cpath}: missing")
        return report
    if manifest.get("clips_sha256") and file_sha256(cpath) != manifest["clips_sha256"]:
        report.problems.append(f"{cpath}: checksum differs from the manifest's")
    try:
        records = read_json(cpath)
    except ValueError as e:
        report.problems.append(f"{cpath}: unreadable ({e})")
        return report
    report.clips = len(records)
    if manifest.get("num_clips") is not None and manifest["num_clips"] != len(records):
        report.problems.append(f"{cpath}: {len(records)} clips, the manifest says {manifest['num_clips']}")
    by_shard: Dict[int, Dict[str, int]] = defaultdict(dict)
    for r in records:
        by_shard[int(r["shard"])][r["name"]] = int(r["num_frames"])
    n_layers = len(manifest["layers"])
    dim = int(manifest["dim"])
    pooled = bool(manifest.get("pooled_stats"))
    dtype = manifest.get("dtype", "float16")
    for index, entry in enumerate(tqdm(manifest["shards"], desc="verifying shards", unit="shard",
                                       disable=not verbose, file=sys.stderr)):
        f = path / entry["file"]
        if not f.is_file():
            report.problems.append(f"{f}: missing")
            continue
        size = f.stat().st_size
        report.bytes += size
        if size != entry.get("bytes", size):
            report.problems.append(f"{f}: {size} bytes, the manifest says {entry['bytes']}")
            continue
        if checksums and file_sha256(f) != entry["sha256"]:
            report.problems.append(f"{f}: SHA-256 differs from the manifest's (the file is damaged)")
            continue
        try:
            with h5py.File(f, "r") as h:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in h["names"][()]]
                if len(names) != entry["clips"]:
                    report.problems.append(f"{f}: {len(names)} clips, the manifest says {entry['clips']}")
                expected = by_shard.get(index, {})
                if set(names) != set(expected):
                    missing = sorted(set(expected) - set(names))
                    extra = sorted(set(names) - set(expected))
                    report.problems.append(f"{f}: clips differ from clips.json (missing {missing[:3]}, "
                                           f"extra {extra[:3]})")
                for n in names:
                    ds = h["frames"].get(n)
                    if ds is None:
                        report.problems.append(f"{f}: clip {n} has no frames")
                        continue
                    want = (expected.get(n, ds.shape[0]), n_layers, dim)
                    if tuple(ds.shape) != want:
                        report.problems.append(f"{f}: clip {n} frames have shape {tuple(ds.shape)}, expected {want}")
                    if str(ds.dtype) != dtype:
                        report.problems.append(f"{f}: clip {n} stored as {ds.dtype}, the manifest says {dtype}")
                    if pooled and ("pooled" not in h or n not in h["pooled"]):
                        report.problems.append(f"{f}: clip {n} has no pooled statistics")
        except (OSError, KeyError) as e:
            report.problems.append(f"{f}: unreadable HDF5 ({e})")
    return report


def check_cache(path, **kw) -> VerifyReport:
    """Like :func:`verify_cache` but raises :class:`CacheError` listing the problems."""
    report = verify_cache(path, **kw)
    if report.problems:
        raise CacheError(f"{path}: " + "; ".join(report.problems[:10]))
    return report
