"""verify-cache: check every shard of a feature cache against its manifest."""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
from tqdm import tqdm

from conilium.cache.reader import CLIPS, load_manifest
from conilium.cache.shards import RUN_BYTES, ShardIndex, all_finite, crc32, file_sha256, read_shard_index
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


def damaged_clips(index: ShardIndex) -> List[str]:
    """The clips of a shard whose frames or pooled statistics fail their CRC-32 check (each layer
    read in blocks of up to :data:`~conilium.cache.shards.RUN_BYTES`)."""
    return scan_clips(index)[0]


def scan_clips(index: ShardIndex) -> Tuple[List[str], List[str]]:
    """One read of a shard's clips: those failing their CRC-32 check, and those holding NaN or
    ±inf (a writer that stored them so: their checksums agree)."""
    bad: List[str] = []
    non_finite: List[str] = []
    n = len(index.names)
    with open(index.path, "rb", buffering=0) as f:
        for k in range(index.num_layers):
            i = 0
            while i < n:
                j, frames = i, 0  # clips i..j-1 in one read
                while j < n and (j == i or (frames + int(index.num_frames[j])) * index.row_bytes <= RUN_BYTES):
                    frames += int(index.num_frames[j])
                    j += 1
                a = int(index.offsets[i])
                buf = np.empty((frames, index.dim), index.dtype)
                f.seek(index.layer_offset(k, a) if frames else 0)
                if f.readinto(buf) != buf.nbytes:
                    return [f"{index.names[i]} (truncated)"], non_finite
                for m in range(i, j):
                    s = int(index.offsets[m]) - a
                    clip = buf[s : s + int(index.num_frames[m])]
                    if crc32(clip) != int(index.crc[m, k]):
                        bad.append(index.names[m])
                    elif not all_finite(clip):
                        non_finite.append(index.names[m])
                i = j
        if index.pooled_shape is not None and n:
            per = index.pooled_bytes
            for m in range(n):
                f.seek(index.pooled_offset + m * per)
                buf = f.read(per)
                if len(buf) != per or crc32(buf) != int(index.pooled_crc[m]):
                    bad.append(f"{index.names[m]} (pooled)")
                elif not all_finite(np.frombuffer(buf, dtype=np.float32)):
                    non_finite.append(f"{index.names[m]} (pooled)")
    return list(dict.fromkeys(bad)), list(dict.fromkeys(non_finite))


def verify_cache(path, *, checksums: bool = True, verbose: bool = False) -> VerifyReport:
    """Check ``path``'s manifest, clips.json and every shard (size, SHA-256, clips, frames; with
    ``checksums``, every stored value finite too).

    Raises :class:`CacheError` when the manifest itself is missing, incomplete, of another
    format or fails its own checksum (edited or damaged); returns a :class:`VerifyReport`
    whose ``problems`` list everything else found wrong. A shard whose SHA-256 differs is
    read clip by clip to name the damaged clips (their CRC-32s).
    """
    path = Path(path)
    manifest = load_manifest(path)
    report = VerifyReport(shards=len(manifest.get("shards", [])))
    records = _read_clips(path, manifest, report)
    if records is None:
        return report
    by_shard: Dict[int, Dict[str, int]] = defaultdict(dict)
    for r in records:
        by_shard[int(r["shard"])][r["name"]] = int(r["num_frames"])
    layout = _Layout(len(manifest["layers"]), int(manifest["dim"]), manifest.get("dtype", "float16"),
                     bool(manifest.get("pooled_stats")))
    for index, entry in enumerate(tqdm(manifest["shards"], desc="verifying shards", unit="shard",
                                       disable=not verbose, file=sys.stderr)):
        f = path / entry["file"]
        if not f.is_file():
            report.problems.append(f"{f}: missing")
            continue
        size = f.stat().st_size
        report.bytes += size
        report.problems += _shard_problems(f, size, entry, by_shard.get(index, {}), layout, checksums)
    return report


def _read_clips(path: Path, manifest: dict, report: VerifyReport) -> Optional[list]:
    """clips.json's records, checked against the manifest (problems go to ``report``); None when
    it is missing or unreadable."""
    cpath = path / CLIPS
    if not cpath.is_file():
        report.problems.append(f"{cpath}: missing")
        return None
    if file_sha256(cpath) != manifest.get("clips_sha256"):
        report.problems.append(f"{cpath}: checksum differs from the manifest's")
    try:
        records = read_json(cpath)
    except ValueError as e:
        report.problems.append(f"{cpath}: unreadable ({e})")
        return None
    report.clips = len(records)
    if manifest.get("num_clips") is not None and manifest["num_clips"] != len(records):
        report.problems.append(f"{cpath}: {len(records)} clips, the manifest says {manifest['num_clips']}")
    return records


class _Layout(NamedTuple):
    """What the manifest says every shard holds."""

    num_layers: int
    dim: int
    dtype: str
    pooled: bool


def _shard_problems(f: Path, size: int, entry: dict, expected: Dict[str, int], layout: _Layout,
                    checksums: bool) -> List[str]:
    """What is wrong with shard file ``f`` (``size`` bytes): its size and SHA-256 against the
    manifest's ``entry``, then its clips (``expected``: clips.json's names and frame counts)."""
    if size != entry.get("bytes", size):
        return [f"{f}: {size} bytes, the manifest says {entry['bytes']}"]
    if checksums and file_sha256(f) != entry["sha256"]:
        problem = f"{f}: SHA-256 differs from the manifest's (the file is damaged)"
        try:
            bad = damaged_clips(read_shard_index(f))
        except (CacheError, OSError) as e:
            problem += f"; its index is damaged too ({e})"
        else:
            if bad:
                problem += f"; clip(s) failing their CRC-32 check: {', '.join(bad[:5])}" + (" …" if len(bad) > 5 else "")
        return [problem]
    try:
        shard = read_shard_index(f)
    except CacheError as e:
        return [str(e)]
    problems = []
    names = shard.names
    n_layers, dim, dtype = layout.num_layers, layout.dim, layout.dtype
    if len(names) != entry["clips"]:
        problems.append(f"{f}: {len(names)} clips, the manifest says {entry['clips']}")
    if set(names) != set(expected):
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        problems.append(f"{f}: clips differ from clips.json (missing {missing[:3]}, "
                        f"extra {extra[:3]})")
    if names and (shard.num_layers, shard.dim) != (n_layers, dim):
        problems.append(f"{f}: frames of {shard.num_layers} layer(s) × {shard.dim}, the manifest says "
                        f"{n_layers} × {dim}")
    if names and str(shard.dtype) != dtype:
        problems.append(f"{f}: frames stored as {shard.dtype}, the manifest says {dtype}")
    for i, n in enumerate(names):
        t = int(shard.num_frames[i])
        want = (expected.get(n, t), n_layers, dim)
        if (t, shard.num_layers, shard.dim) != want:
            problems.append(f"{f}: clip {n} frames have shape {(t, shard.num_layers, shard.dim)}, "
                            f"expected {want}")
    if layout.pooled and names and shard.pooled_shape is None:
        problems.append(f"{f}: no pooled statistics (for clips {', '.join(names[:3])} …)")
    if checksums and not problems:
        _, non_finite = scan_clips(shard)
        if non_finite:
            problems.append(f"{f}: clip(s) holding NaN or infinite values (written so: their checksums agree): "
                            f"{', '.join(non_finite[:5])}{' …' if len(non_finite) > 5 else ''}; no head can train "
                            f"on them: rebuild the cache with extract-features --overwrite")
    return problems
