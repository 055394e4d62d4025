"""The on-disk feature cache: HDF5 shards, ``clips.json`` and ``manifest.json``.

Layout of a cache directory::

    manifest.json        settings, upstream identity, corpus fingerprint, normalisation
                         statistics, skipped clips, shards + checksums, the clips.json
                         checksum, and last its own checksum (written last)
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

Shards, format 2
----------------
Each shard holds a few hundred clips (N), T frames in all, L stored layers of dim D::

    attrs        format = 2, shard_index
    names        (N,) str            the clips, in the order they were written
    offsets      (N,) int64          first frame of clip i on the frame axis
    num_frames   (N,) int64          frames of clip i
    crc32        (N, L) uint32       CRC-32 of clip i's bytes of stored layer l
    frames       (L, T, D)           float16 (or float32), contiguous, unfiltered
    pooled       (N, L_all, 2, D)    float32 per-layer mean and std over frames (optional)
    pooled_crc32 (N,) uint32         CRC-32 of clip i's pooled bytes (with pooled)

``frames`` and ``pooled`` are plain contiguous byte ranges of the file (their file offsets
come from HDF5), so a clip's layer ``l`` is the ``num_frames·D`` values at
``frames[l, offsets[i]:offsets[i] + num_frames[i]]``: one read of exactly its own bytes,
with no HDF5 machinery on the way. Reading a clip reads one range per layer; a batch of
neighbouring clips or a whole shard, one range per layer. Each clip's bytes are checked
against their CRC-32 when a reader first reads them (a damaged clip is a
:class:`CacheError` naming shard and clip; later epochs reread them unchecked); the
small index datasets carry HDF5's fletcher32 checksum. Shards are assembled under a
temporary name and renamed when complete; ``manifest.json`` is written last, with
``"complete": true``. Caches are written through
:class:`conilium.cache.writer.CacheWriter` (extract-features and synthetic test caches alike).

Integrity: the manifest records every shard's SHA-256 and size, the SHA-256 of clips.json
(checked whenever a cache is opened) and the SHA-256 of its own content
(``"manifest_sha256"``, checked whenever it is loaded). verify-cache checks all of them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

from conilium.corpus import Clip
from conilium.errors import CacheError, OutputError
from conilium.util import _default as _json_default
from conilium.util import atomic_path, free_bytes, read_json, write_json

try:  # the same CRC-32 as zlib's, ~10x faster (PCLMUL folding); optional
    from isal.isal_zlib import crc32 as _crc32

    CRC_IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32 as _crc32

    CRC_IMPLEMENTATION = "zlib"

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
CLIPS = "clips.json"
SHARD_DIR = "shards"
#: The manifest's checksum of its own content: every other field (see :func:`manifest_checksum`).
MANIFEST_CHECKSUM = "manifest_sha256"
#: What to do with a cache of an older format (format 1: one HDF5 dataset per clip).
UPGRADE_HINT = ("convert it in place, frames unchanged, with `conilium extract upgrade DIR`, "
                "or rebuild it: rerun extract-features with the same options and --overwrite")

#: Files that make a directory something other than a feature cache (see :func:`not_a_cache`).
#: ``conilium_model.json`` is :data:`conilium.extract.upstreams.FINETUNED_MARKER`, spelled out here
#: so that telling directories apart imports no model library.
MODEL_MARKER = "conilium_model.json"
#: What extract-features writes into a cache directory before its manifest.
CACHE_TRACES = ("extraction.json", CLIPS, SHARD_DIR)

_MIB = 1 << 20
#: Largest single read (bytes) when neighbouring clips are read together.
RUN_BYTES = 64 * _MIB


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.h5"


def file_sha256(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def crc32(data) -> int:
    """CRC-32 (zlib's polynomial) of a bytes-like object or a C-contiguous array."""
    if isinstance(data, np.ndarray) and not data.size:
        return 0
    return _crc32(data) & 0xFFFFFFFF


def manifest_checksum(manifest: Mapping) -> str:
    """SHA-256 of the manifest's content: every field but :data:`MANIFEST_CHECKSUM`, as
    canonical JSON (sorted keys, no spaces), so that it survives a round trip through the file."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    body = json.loads(json.dumps(body, default=_json_default))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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


# ---------------------------------------------------------------------------------- writing
class _Spool:
    """Streams a shard's clips into temporary files, one per stored layer (and one for the
    pooled statistics), so that each layer ends up contiguous in the shard; records the
    index (names, offsets, frame counts, CRC-32s) on the way."""

    def __init__(self, path: Path, dtype: np.dtype, num_layers: Optional[int], dim: Optional[int]):
        self.path = path
        self.dtype = dtype
        self.num_layers, self.dim = num_layers, dim
        self.names: List[str] = []
        self.offsets: List[int] = []
        self.lengths: List[int] = []
        self.crc: List[List[int]] = []
        self.pooled_crc: List[int] = []
        self.pooled_shape: Optional[Tuple[int, ...]] = None
        self.total = 0
        self.files: List[Tuple[Path, object]] = []  # per layer, then pooled: (path, raw file)
        self._seen = set()

    def __enter__(self) -> "_Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for p, f in self.files:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                p.unlink()
        self.files = []

    def _open(self, what: str):
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".{what}.spool.tmp", dir=self.path.parent)
        f = os.fdopen(fd, "wb", buffering=0)
        self.files.append((Path(tmp), f))
        return f

    @staticmethod
    def _write(f, arr: np.ndarray) -> None:
        if not arr.size:
            return
        view = memoryview(arr).cast("B")
        while len(view):
            n = f.write(view)
            view = view[n:]

    def add(self, name: str, frames: np.ndarray, pooled: Optional[np.ndarray]) -> None:
        if frames.ndim != 3:
            raise CacheError(f"clip {name}: frames must be (frames, layers, dim), got {frames.shape}")
        if name in self._seen:
            raise CacheError(f"clip {name}: written twice into shard {self.path.name}")
        self._seen.add(name)
        arr = to_float16(frames, name) if self.dtype == np.float16 else frames.astype(np.float32)
        t, nl, d = arr.shape
        if self.num_layers is None:
            self.num_layers, self.dim = nl, d
        if (nl, d) != (self.num_layers, self.dim):
            raise CacheError(f"clip {name}: frames of shape {arr.shape}; this cache stores "
                             f"(frames, {self.num_layers}, {self.dim})")
        if not self.files:
            for k in range(nl):
                self._open(f"layer{k}")
        crcs = []
        for k in range(nl):
            block = np.ascontiguousarray(arr[:, k, :])
            crcs.append(crc32(block))
            self._write(self.files[k][1], block)
        if (pooled is None) != (self.pooled_shape is None) and self.names:
            raise CacheError(f"clip {name}: pooled statistics given for some clips of the shard only")
        if pooled is not None:
            p = np.ascontiguousarray(pooled, dtype=np.float32)
            if self.pooled_shape is None:
                if p.ndim != 3 or p.shape[1] != 2:
                    raise CacheError(f"clip {name}: pooled statistics must be (layers, 2, dim), got {p.shape}")
                self.pooled_shape = p.shape
                self._open("pooled")
            elif p.shape != self.pooled_shape:
                raise CacheError(f"clip {name}: pooled statistics of shape {p.shape}, the shard's other clips "
                                 f"have {self.pooled_shape}")
            self.pooled_crc.append(crc32(p))
            self._write(self.files[nl][1], p)
        self.names.append(name)
        self.offsets.append(self.total)
        self.lengths.append(t)
        self.crc.append(crcs)
        self.total += t

    def close_files(self) -> None:
        for _, f in self.files:
            f.close()

    def reserve_room(self, tmp: Path) -> None:
        """Make sure the disk has room for the shard's HDF5 metadata before HDF5 writes any:
        HDF5 failing to write on a full disk can take the process down. The room is allocated
        in ``tmp`` (which HDF5 then truncates); no room is an OutputError naming the shard.
        (The frames are then copied with plain writes, whose failure is an ordinary OSError.)"""
        need = _MIB + 256 * len(self.names) + sum(len(n.encode()) for n in self.names)
        if not hasattr(os, "posix_fallocate"):  # pragma: no cover - not Linux
            return
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.posix_fallocate(fd, 0, need)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = free_bytes(self.path.parent)
                raise OutputError(self.path, "no space left on device" + (
                    f" ({free / _MIB:.1f} MiB free)" if free is not None else ""),
                    "free some space or choose another output directory, then run again") from None
            # no fallocate on this file system: nothing reserved
        finally:
            os.close(fd)

    def write_shard(self, tmp: Path, shard_index: int) -> None:
        """Write the HDF5 container (index datasets, the data datasets allocated), then copy the
        spooled bytes into the data datasets' byte ranges."""
        n, nl, d = len(self.names), self.num_layers or 0, self.dim or 0
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # the byte range exists at once, unwritten
        ranges: List[Tuple[int, int]] = []  # (file offset, bytes) per spool file
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs["format"] = FORMAT_VERSION
            f.attrs["shard_index"] = shard_index

            def index(name, data):
                data = np.asarray(data)
                chunks = data.shape if data.size else None
                f.create_dataset(name, data=data, chunks=chunks, fletcher32=bool(data.size), track_times=False)

            f.create_dataset("names", data=np.array(self.names, dtype=object), dtype=h5py.string_dtype(),
                             track_times=False)
            index("offsets", np.array(self.offsets, dtype=np.int64))
            index("num_frames", np.array(self.lengths, dtype=np.int64))
            index("crc32", np.array(self.crc, dtype=np.uint32).reshape(n, nl))
            ds = f.create_dataset("frames", shape=(nl, self.total, d), dtype=self.dtype, dcpl=dcpl,
                                  fill_time="never", track_times=False)
            layer_bytes = self.total * d * self.dtype.itemsize
            start = ds.id.get_offset() if layer_bytes else 0
            if self.files:
                ranges += [(start + k * layer_bytes, layer_bytes) for k in range(nl)]
            if self.pooled_shape is not None:
                ps = f.create_dataset("pooled", shape=(n,) + tuple(self.pooled_shape), dtype=np.float32, dcpl=dcpl,
                                      fill_time="never", track_times=False)
                index("pooled_crc32", np.array(self.pooled_crc, dtype=np.uint32))
                pbytes = n * int(np.prod(self.pooled_shape)) * 4
                ranges.append((ps.id.get_offset() if pbytes else 0, pbytes))
        if len(ranges) != len(self.files):  # pragma: no cover - a bug, not a user error
            raise RuntimeError(f"{self.path}: {len(self.files)} spool files for {len(ranges)} byte ranges")
        out = os.open(tmp, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for (spool, _), (offset, nbytes) in zip(list(self.files), ranges):
                if spool.stat().st_size != nbytes:  # pragma: no cover - a bug, not a user error
                    raise RuntimeError(f"{spool}: {spool.stat().st_size} bytes spooled, {nbytes} expected")
                if nbytes:
                    _copy_range(spool, out, offset, nbytes)
                spool.unlink()  # its room is free for the next layer
        finally:
            os.close(out)
        self.files = [(p, f) for p, f in self.files if p.exists()]


def _copy_range(src: Path, dst_fd: int, offset: int, nbytes: int) -> None:
    """Copy the file ``src`` (``nbytes`` long) to ``dst_fd`` at ``offset`` (in the kernel where it can)."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        done = 0
        use_kernel = hasattr(os, "copy_file_range")
        while done < nbytes:
            if use_kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, nbytes - done, done, offset + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                        raise
                    use_kernel = False
                    continue
            else:
                block = os.pread(fd, min(nbytes - done, 16 * _MIB), done)
                n = os.pwrite(dst_fd, block, offset + done) if block else 0
            if n <= 0:
                raise OSError(errno.EIO, f"short copy of {src} ({done} of {nbytes} bytes)")
            done += n
    finally:
        os.close(fd)


def write_shard(path, items: Iterable[Tuple[str, np.ndarray, Optional[np.ndarray]]], *,
                dtype: str = "float16", shard_index: int = 0, num_layers: Optional[int] = None,
                dim: Optional[int] = None) -> dict:
    """Write one shard atomically from ``(name, frames (T, L, D), pooled (L_all, 2, D) or None)``.

    The items are streamed to temporary spool files (one per layer) beside ``path``, then
    the shard is assembled under a temporary name and renamed onto ``path``; nothing of it is
    left behind on failure. ``num_layers`` and ``dim``, when given, are checked against every
    clip. A disk that fills up is an :class:`~conilium.errors.OutputError` naming ``path``.
    Returns the manifest entry ``{"file", "clips", "sha256", "bytes"}`` (``file`` relative to
    the cache directory when ``path`` lies in its ``shards/`` folder).
    """
    path = Path(path)
    np_dtype = np.dtype(np.float16 if dtype == "float16" else np.float32)
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with _Spool(path, np_dtype, num_layers, dim) as spool:
            for name, frames, pooled in items:
                spool.add(name, frames, pooled)
            spool.close_files()
            spool.reserve_room(tmp)
            spool.write_shard(tmp, shard_index)
        names = spool.names
    rel = f"{SHARD_DIR}/{path.name}" if path.parent.name == SHARD_DIR else str(path)
    return {"file": rel, "clips": len(names), "sha256": file_sha256(path), "bytes": path.stat().st_size}


# ---------------------------------------------------------------------------------- the index
@dataclass
class ShardIndex:
    """What a format-2 shard holds and where (read once per shard by :func:`read_shard_index`)."""

    path: Path
    names: List[str]
    offsets: np.ndarray  # int64 (N,)
    num_frames: np.ndarray  # int64 (N,)
    crc: np.ndarray  # uint32 (N, L)
    num_layers: int
    dim: int
    dtype: np.dtype
    total_frames: int
    data_offset: Optional[int]  # file offset of frames (L, T, D); None when it holds no byte
    pooled_shape: Optional[Tuple[int, int, int]] = None  # (L_all, 2, D)
    pooled_offset: Optional[int] = None
    pooled_crc: Optional[np.ndarray] = None
    position: Dict[str, int] = field(default_factory=dict)
    #: (N, L) / (N,): which clips' layers / pooled statistics this process has checked already
    verified: Optional[np.ndarray] = None
    pooled_verified: Optional[np.ndarray] = None

    def __post_init__(self):
        self.position = {n: i for i, n in enumerate(self.names)}
        self.verified = np.zeros((len(self.names), self.num_layers), dtype=bool)
        self.pooled_verified = np.zeros(len(self.names), dtype=bool)

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def layer_offset(self, layer: int, frame: int) -> int:
        """File offset of ``frame`` (on the shard's frame axis) of stored layer ``layer``."""
        return self.data_offset + (layer * self.total_frames + frame) * self.row_bytes

    @property
    def pooled_bytes(self) -> int:
        return int(np.prod(self.pooled_shape)) * 4 if self.pooled_shape else 0


def _contiguous_offset(ds, path: Path) -> Optional[int]:
    plist = ds.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
        raise CacheError(f"{path}: dataset {ds.name} is not stored contiguously and unfiltered; "
                         f"the shard was not written by conilium; rebuild the cache")
    return ds.id.get_offset()


def read_shard_index(path) -> ShardIndex:
    """The index of the format-2 shard ``path`` (names, offsets, frame counts, CRC-32s, byte
    ranges); a :class:`CacheError` naming the shard when it cannot be read or is inconsistent."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            if fmt != FORMAT_VERSION:
                raise CacheError(f"{path}: shard of format {fmt!r}, this conilium reads format {FORMAT_VERSION}; "
                                 f"{UPGRADE_HINT}")
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]]
            offsets = np.asarray(f["offsets"][()], dtype=np.int64)
            lengths = np.asarray(f["num_frames"][()], dtype=np.int64)
            crc = np.asarray(f["crc32"][()], dtype=np.uint32)
            ds = f["frames"]
            num_layers, total, dim = (int(v) for v in ds.shape)
            index = ShardIndex(path, names, offsets, lengths, crc.reshape(len(names), num_layers), num_layers,
                               dim, np.dtype(ds.dtype), total, _contiguous_offset(ds, path))
            if "pooled" in f:
                ps = f["pooled"]
                index.pooled_shape = tuple(int(v) for v in ps.shape[1:])
                index.pooled_offset = _contiguous_offset(ps, path)
                index.pooled_crc = np.asarray(f["pooled_crc32"][()], dtype=np.uint32)
    except CacheError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CacheError(f"{path}: unreadable shard index ({e}); run verify-cache, then rerun extract-features "
                         f"with the same options to repair it") from None
    n = len(names)
    if not (len(offsets) == len(lengths) == n):
        raise CacheError(f"{path}: the shard's index is inconsistent ({n} names, {len(offsets)} offsets, "
                         f"{len(lengths)} frame counts)")
    if n and (np.any(lengths < 0) or np.any(offsets < 0) or np.any(offsets + lengths > total)):
        raise CacheError(f"{path}: the shard's index points outside its frames")
    data_bytes = num_layers * total * index.row_bytes
    if data_bytes and (index.data_offset is None or index.data_offset + data_bytes > size):
        raise CacheError(f"{path}: the shard is shorter than its frames ({size} bytes); the file is truncated")
    if index.pooled_shape is not None:
        pbytes = n * index.pooled_bytes
        if pbytes and (index.pooled_offset is None or index.pooled_offset + pbytes > size
                       or index.pooled_crc is None or len(index.pooled_crc) != n):
            raise CacheError(f"{path}: the shard's pooled statistics are truncated or have no checksums")
    return index


# ---------------------------------------------------------------------------------- what a directory is
def _cache_of_run(run_dir: Path) -> Optional[str]:
    try:
        value = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("cache")
    except (OSError, ValueError, AttributeError):
        return None
    return str(value) if value else None


def not_a_cache(path) -> Optional[str]:
    """Why ``path``, a directory without ``manifest.json``, is not a feature cache: what it is
    (a train-head run, a finetune-best model directory, a corpus, a folder of caches, …) and
    what to pass instead; None when it looks like a cache whose extraction did not finish
    (or when it has a manifest, or does not exist: the cache reader explains those)."""
    p = Path(path)
    if p.is_file():
        if p.name == MANIFEST:
            return f"{p} is a cache's manifest file; pass its directory to --cache: {p.parent}"
        return f"{p} is a file, not a feature cache directory; pass the directory extract-features wrote"
    if not p.is_dir() or (p / MANIFEST).is_file():
        return None
    if (p / MODEL_MARKER).is_file() or (p / "checkpoints" / "last.pt").is_file():
        unfinished = "" if (p / MODEL_MARKER).is_file() else " (unfinished)"
        return (f"{p} is a finetune-best model directory{unfinished}, not a feature cache. To train a head "
                f"on its fine-tuned upstream, extract features with it first (extract-features --corpus CORPUS "
                f"--upstream {p} --out CACHE_DIR) and pass that CACHE_DIR to --cache; to predict with it, use "
                f"predict --model {p}")
    if (p / "config.json").is_file() and any((p / f).exists() for f in ("metrics.json", "model.pt",
                                                                         "predictions")):
        used = _cache_of_run(p)
        tail = (f"; this run was trained on --cache {used}" if used else
                "; pass the cache directory extract-features wrote")
        return f"{p} is a train-head run directory (config.json, metrics.json/model.pt), not a feature cache{tail}"
    if (p / "grid.json").is_file() or (p / "results.csv").is_file():
        return (f"{p} is a train-grid output directory, not a feature cache; pass the cache directory "
                f"extract-features wrote")
    if (p / "Audios").is_dir() or (p / "Labels").is_dir():
        return (f"{p} is a corpus (Audios/, Labels/), not a feature cache; extract its features first "
                f"(extract-features --corpus {p} --upstream UPSTREAM --out CACHE_DIR) and pass that CACHE_DIR "
                f"to --cache")
    if any((p / t).exists() for t in CACHE_TRACES):
        return None  # an unfinished extraction: the cache reader says to resume it
    caches = sorted(c.name for c in p.iterdir() if c.is_dir() and (c / MANIFEST).is_file())
    if caches:
        shown = ", ".join(str(p / c) for c in caches[:5]) + (" …" if len(caches) > 5 else "")
        return f"{p} is not a feature cache but a folder of caches; pass one of them to --cache: {shown}"
    return (f"{p} is not a feature cache (no {MANIFEST}, and nothing extract-features writes); "
            f"pass the directory extract-features wrote")


def check_cache_dir(path) -> None:
    """A :class:`CacheError` saying what ``path`` is, when it is another kind of directory than
    a feature cache (see :func:`not_a_cache`); silence otherwise."""
    why = not_a_cache(path)
    if why is not None:
        raise CacheError(why)


# ---------------------------------------------------------------------------------- the manifest
def manifest_problem(manifest: Mapping) -> Optional[str]:
    """Why a manifest read from disk cannot be used as it is (another format, a checksum that
    does not match its content, not complete), or None."""
    fmt = manifest.get("format")
    if fmt != FORMAT_VERSION:
        return f"cache format {fmt!r}, this conilium reads format {FORMAT_VERSION}"
    if not manifest.get("complete"):
        return "the cache is incomplete (extraction did not finish)"
    if manifest.get(MANIFEST_CHECKSUM) != manifest_checksum(manifest):
        return "its checksum does not match its content (the manifest was edited or damaged)"
    return None


def load_manifest(path) -> dict:
    """The manifest of the complete cache ``path``, checked against its own checksum.

    A :class:`CacheError` otherwise, saying what ``path`` is when it is no cache (a run, a
    model, a corpus, a folder of caches) and what to run when the cache is incomplete,
    damaged or of an older format."""
    path = Path(path)
    mpath = path / MANIFEST
    if path.is_file():
        raise CacheError(not_a_cache(path))
    if not path.is_dir():
        raise CacheError(f"{path}: cache directory not found (build it with extract-features)")
    if not mpath.is_file():
        check_cache_dir(path)
        raise CacheError(f"{path}: no {MANIFEST}: the cache is incomplete (extraction did not finish); "
                         f"rerun extract-features with the same options to resume it")
    try:
        manifest = read_json(mpath)
    except ValueError as e:
        raise CacheError(f"{mpath}: corrupt manifest ({e}); rerun extract-features with the same options "
                         f"to rewrite it (intact shards are kept)") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{mpath}: corrupt manifest (not a JSON object); rerun extract-features with the same "
                         f"options to rewrite it (intact shards are kept)")
    fmt = manifest.get("format")
    if fmt != FORMAT_VERSION:
        hint = UPGRADE_HINT if fmt == 1 else "rebuild it: rerun extract-features with the same options and --overwrite"
        raise CacheError(f"{mpath}: cache format {fmt!r}, this conilium reads format {FORMAT_VERSION}; {hint}")
    if not manifest.get("complete"):
        raise CacheError(f"{path}: the cache is incomplete (extraction did not finish); "
                         f"rerun extract-features with the same options to resume it")
    if manifest.get(MANIFEST_CHECKSUM) != manifest_checksum(manifest):
        raise CacheError(f"{mpath}: its checksum does not match its content: the manifest was edited or damaged; "
                         f"run verify-cache, then rerun extract-features with the same options to rewrite it "
                         f"(intact shards are kept)")
    return manifest


def read_clips(path, manifest: Mapping) -> List[dict]:
    """The records of ``path``'s clips.json, checked against the manifest's checksum of it."""
    cpath = Path(path) / CLIPS
    if not cpath.is_file():
        raise CacheError(f"{path}: {CLIPS} missing: the cache is incomplete; rerun extract-features with the same "
                         f"options to rewrite it")
    data = cpath.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("clips_sha256"):
        raise CacheError(f"{cpath}: checksum differs from the manifest's: the file was edited or damaged; "
                         f"rerun extract-features with the same options to rewrite it (intact shards are kept)")
    try:
        records = json.loads(data.decode("utf-8"))
    except ValueError as e:  # pragma: no cover - the checksum matched
        raise CacheError(f"{cpath}: unreadable ({e})") from None
    return records


# ---------------------------------------------------------------------------------- reading
class FeatureCache:
    """Read access to a feature cache directory.

    >>> cache = FeatureCache("cache/wavlm-large")
    >>> cache.names[:2], cache.manifest["dim"]
    >>> x = cache.frames(cache.names[0])      # float32 (frames, layers, dim)

    Opening checks the manifest against its own checksum and clips.json against the
    manifest's; frames and pooled statistics are checked against the clip's CRC-32 the
    first time this reader reads them (``verify=True``, the default: a head trained for 40
    epochs pays the checksum in its first epoch only), at every read (``"always"``), or
    never (``False``, for measurements only). A shard's index is read
    once; its frames are then read with plain positional reads of the file (no HDF5 on the
    way). At most ``max_open`` shard files stay open at once (one closed while another
    thread reads it is closed when that read ends); the reader can be shared by threads and
    handed to DataLoader workers (forked or pickled).
    """

    def __init__(self, path, *, max_open: int = 16, verify: Union[bool, str] = True):
        if verify not in (True, False, "once", "always"):
            raise ValueError(f"verify must be True (once per clip), 'always' or False, not {verify!r}")
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self._shards = [self.path / s["file"] for s in self.manifest["shards"]]
        missing = [str(p) for p in self._shards if not p.is_file()]
        if missing:
            raise CacheError(f"{self.path}: shard file(s) missing: {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''}; run verify-cache, then extract-features to repair")
        records = read_clips(self.path, self.manifest)
        self.clips: Dict[str, Clip] = OrderedDict()
        self._where: Dict[str, Tuple[int, int]] = {}
        self._source: Dict[str, str] = {}
        self._members: Dict[int, List[str]] = {}
        try:
            for r in records:
                name, shard = r["name"], int(r["shard"])
                self.clips[name] = Clip.from_json(r)
                self._where[name] = (shard, int(r["num_frames"]))
                self._members.setdefault(shard, []).append(name)
                if r.get("source"):
                    self._source[name] = r["source"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CacheError(f"{self.path / CLIPS}: malformed record ({type(e).__name__}: {e})") from None
        bad = [s for s in self._members if not 0 <= s < len(self._shards)]
        if bad:
            raise CacheError(f"{self.path / CLIPS}: clips in shard(s) {bad[:5]}, the cache has {len(self._shards)}")
        self.names: List[str] = list(self.clips)
        self.max_open = max_open
        self.verify = bool(verify)
        self._verify_always = verify == "always"
        self._index: Dict[int, ShardIndex] = {}
        self._reset_files()
        self._dtype = np.dtype(np.float32 if self.manifest.get("dtype") == "float32" else np.float16)

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

    def shard_names(self, index: int) -> List[str]:
        """The clips of shard ``index``, in the order clips.json lists them."""
        return list(self._members.get(index, []))

    # ---- shards -----------------------------------------------------------------------
    def shard_index(self, index: int) -> ShardIndex:
        """The index of shard ``index`` (read once), checked against clips.json and the manifest."""
        idx = self._index.get(index)
        if idx is not None:
            return idx
        idx = read_shard_index(self._shards[index])
        want = (len(self.layers), self.dim, self._dtype)
        if idx.names and (idx.num_layers, idx.dim, idx.dtype) != want:
            raise CacheError(f"{idx.path}: frames of {idx.num_layers} layer(s) × {idx.dim} {idx.dtype}, the "
                             f"manifest says {want[0]} × {want[1]} {want[2]}; run verify-cache")
        if self.has_pooled and idx.names and idx.pooled_shape is None:
            raise CacheError(f"{idx.path}: no pooled statistics, the manifest says the cache has them; "
                             f"run verify-cache")
        for name in self._members.get(index, []):
            i = idx.position.get(name)
            if i is None:
                raise CacheError(f"{idx.path}: clip {name} missing from the shard; run verify-cache")
            if int(idx.num_frames[i]) != self._where[name][1]:
                raise CacheError(f"{idx.path}: clip {name} has {int(idx.num_frames[i])} frames in the shard, "
                                 f"{self._where[name][1]} in {CLIPS}; run verify-cache")
        self._index[index] = idx
        return idx

    def _reset_files(self) -> None:
        self._fds: "OrderedDict[int, int]" = OrderedDict()  # shard -> descriptor, least recently used first
        self._busy: Dict[int, int] = {}  # descriptor -> reads in flight
        self._retired: set = set()  # evicted while being read: closed when the last read ends
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _acquire(self, index: int) -> int:
        if os.getpid() != self._pid:  # a forked worker: descriptors and lock of its own
            for fd in list(self._fds.values()) + list(self._retired):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._reset_files()
        with self._lock:
            fd = self._fds.get(index)
            if fd is None:
                try:
                    fd = os.open(self._shards[index], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise CacheError(f"{self._shards[index]}: cannot open shard ({e}); run verify-cache") from None
                self._fds[index] = fd
                while len(self._fds) > self.max_open:
                    _, old = self._fds.popitem(last=False)
                    if self._busy.get(old):
                        self._retired.add(old)
                    else:
                        os.close(old)
            else:
                self._fds.move_to_end(index)
            self._busy[fd] = self._busy.get(fd, 0) + 1
            return fd

    def _release(self, fd: int) -> None:
        with self._lock:
            n = self._busy.get(fd, 1) - 1
            if n > 0:
                self._busy[fd] = n
                return
            self._busy.pop(fd, None)
            if fd in self._retired:
                self._retired.discard(fd)
                os.close(fd)

    @contextlib.contextmanager
    def _file(self, index: int) -> Iterator[int]:
        """The open descriptor of shard ``index``, kept open while the block reads it."""
        fd = self._acquire(index)
        try:
            yield fd
        finally:
            self._release(fd)

    def _locate(self, name: str) -> Tuple[int, ShardIndex, int]:
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"clip {name} is not in cache {self.path}")
        idx = self.shard_index(where[0])
        return where[0], idx, idx.position[name]

    def _positions(self, layer: Optional[int]) -> List[int]:
        n = len(self.manifest["layers"])
        if layer is None:
            return list(range(n))
        if not -n <= layer < n:
            raise IndexError(f"stored layer position {layer} out of range: the cache stores {n} layer(s) "
                             f"(upstream layers {self.layers})")
        return [layer % n]

    @staticmethod
    def _pread(fd: int, buf: np.ndarray, offset: int, idx: ShardIndex) -> None:
        want = buf.nbytes
        if not want:
            return
        try:
            got = os.preadv(fd, [buf], offset)
        except OSError as e:
            raise CacheError(f"{idx.path}: cannot read the shard ({e}); run verify-cache") from None
        if got != want:
            raise CacheError(f"{idx.path}: the shard is truncated (read {got} of {want} bytes at {offset}); "
                             f"run verify-cache, then rerun extract-features with the same options to repair it")

    def _damaged(self, idx: ShardIndex, name: str, what: str) -> CacheError:
        return CacheError(f"{idx.path}: clip {name}: {what} fail their CRC-32 check (the shard is damaged); "
                          f"run verify-cache, then rerun extract-features with the same options to rewrite the shard")

    def _read_run(self, shard: int, idx: ShardIndex, first: int, last: int, positions: Sequence[int]) -> np.ndarray:
        """Frames of the shard's clips ``first..last`` (neighbours), ``(len(positions), frames, dim)``,
        one read per layer, each clip checked against its CRC-32."""
        a = int(idx.offsets[first])
        b = int(idx.offsets[last] + idx.num_frames[last])
        buf = np.empty((len(positions), b - a, idx.dim), idx.dtype)
        with self._file(shard) as fd:
            for j, k in enumerate(positions):
                self._pread(fd, buf[j], idx.layer_offset(k, a), idx)
                if self.verify:  # while the bytes just read are still in the CPU's caches
                    for i in range(first, last + 1):
                        if idx.verified[i, k] and not self._verify_always:
                            continue
                        s = int(idx.offsets[i]) - a
                        if crc32(buf[j, s : s + int(idx.num_frames[i])]) != int(idx.crc[i, k]):
                            raise self._damaged(idx, idx.names[i], f"frames of layer {self.layers[k]}")
                        idx.verified[i, k] = True
        return buf

    @staticmethod
    def _as(x: np.ndarray, dtype) -> np.ndarray:
        if dtype is None or np.dtype(dtype) == x.dtype:
            return x
        out = np.empty(x.shape, dtype=dtype)
        out[...] = x
        return out

    # ---- data -----------------------------------------------------------------------
    def frames(self, name: str, layer: Optional[int] = None, dtype=np.float32) -> np.ndarray:
        """Frames of one clip as (frames, layers, dim), or of one stored layer (position ``layer``,
        shape (frames, 1, dim)); ``dtype=None`` keeps the stored type (float16 or float32).

        In the stored type, several layers come as a (frames, layers, dim) view of the
        layer-major buffer they were read into (``np.ascontiguousarray`` makes it C-ordered);
        a converted array is C-ordered."""
        shard, idx, i = self._locate(name)
        buf = self._read_run(shard, idx, i, i, self._positions(layer))
        return self._as(buf.transpose(1, 0, 2), dtype)

    def pooled(self, name: str) -> np.ndarray:
        """Per-layer mean and std over frames, (all layers, 2, dim) float32."""
        if not self.has_pooled:
            raise CacheError(f"{self.path}: cache has no pooled statistics (extract with --pooled-stats)")
        shard, idx, i = self._locate(name)
        if idx.pooled_shape is None:
            raise CacheError(f"{idx.path}: no pooled statistics in the shard; run verify-cache")
        out = np.empty(idx.pooled_shape, np.float32)
        with self._file(shard) as fd:
            self._pread(fd, out, idx.pooled_offset + i * idx.pooled_bytes, idx)
        if self.verify and (self._verify_always or not idx.pooled_verified[i]):
            if crc32(out) != int(idx.pooled_crc[i]):
                raise self._damaged(idx, name, "pooled statistics")
            idx.pooled_verified[i] = True
        return out

    def iter_frames(self, names: Sequence[str], layer: Optional[int] = None,
                    dtype=np.float32) -> Iterator[Tuple[str, np.ndarray]]:
        """``(name, frames)`` of ``names`` in the given order (as :meth:`frames` returns them).

        Neighbouring clips of a shard (a whole shard, a run of a split) are read together:
        one read per layer for up to :data:`RUN_BYTES` of frames."""
        positions = self._positions(layer)
        names = list(names)
        k = 0
        while k < len(names):
            shard, idx, i = self._locate(names[k])
            per_frame = idx.row_bytes * len(positions)
            frames = int(idx.num_frames[i])
            end = k + 1
            while end < len(names):
                where = self._where.get(names[end])
                if where is None or where[0] != shard:
                    break
                j = idx.position[names[end]]
                if j != i + (end - k) or (frames + where[1]) * per_frame > RUN_BYTES:
                    break
                frames += where[1]
                end += 1
            last = i + (end - k) - 1
            buf = self._read_run(shard, idx, i, last, positions)
            a = int(idx.offsets[i])
            for m in range(i, last + 1):
                s = int(idx.offsets[m]) - a
                yield idx.names[m], self._as(buf[:, s : s + int(idx.num_frames[m])].transpose(1, 0, 2), dtype)
            k = end

    def close(self) -> None:
        """Close the shard files (a file being read by another thread when that read ends)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            for fd in self._fds.values():
                if self._busy.get(fd):
                    self._retired.add(fd)
                else:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_busy", "_retired", "_lock", "_pid")}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset_files()


def write_clips(path, records: List[dict]) -> None:
    write_json(Path(path) / CLIPS, records)


def write_manifest(path, manifest: dict) -> None:
    write_json(Path(path) / MANIFEST, manifest)
