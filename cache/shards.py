"""The shard format: writing a shard's bytes (:func:`write_shard`) and reading its index
(:func:`read_shard_index`); the reader of a whole cache is :class:`conilium.cache.reader.FeatureCache`.

Shards, format 2
================
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
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import h5py
import numpy as np

from conilium.dirs import UPGRADE_HINT, CacheDir, file_sha256  # noqa: F401 (file_sha256 re-exported)
from conilium.errors import CacheError, OutputError
from conilium.util import atomic_path, free_bytes

try:  # the same CRC-32 as zlib's, ~10x faster (PCLMUL folding); optional
    from isal.isal_zlib import crc32 as _crc32

    CRC_IMPLEMENTATION = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32 as _crc32

    CRC_IMPLEMENTATION = "zlib"

FORMAT_VERSION = CacheDir.FORMAT
SHARD_DIR = CacheDir.SHARDS

_MIB = 1 << 20
#: Largest single read (bytes) when neighbouring clips are read together.
RUN_BYTES = 64 * _MIB


def shard_name(index: int) -> str:
    return CacheDir.shard_file(index)


def crc32(data) -> int:
    """CRC-32 (zlib's polynomial) of a bytes-like object or a C-contiguous array."""
    if isinstance(data, np.ndarray) and not data.size:
        return 0
    return _crc32(data) & 0xFFFFFFFF



#: dtype → (signed and unsigned integers of its width, +inf's bits, -inf's bits). A value is NaN
#: or ±inf exactly when its exponent bits are all ones: read as a signed integer, a positive
#: one then lies at or above +inf's bits (negative floats read negative); read as an unsigned
#: integer, a negative one lies at or above -inf's bits.
_FLOAT_BITS = {np.dtype(np.float16): (np.int16, np.uint16, 0x7C00, 0xFC00),
               np.dtype(np.float32): (np.int32, np.uint32, 0x7F80_0000, 0xFF80_0000)}


def all_finite(a: np.ndarray) -> bool:
    """True when no value of the float array ``a`` is NaN or ±inf; for float16 and float32
    two integer maxima over the bits, no temporary array (about the cost of the CRC-32)."""
    if not a.size:
        return True
    bits = _FLOAT_BITS.get(a.dtype)
    if bits is None:
        return bool(np.isfinite(a).all())
    signed, unsigned, pos_inf, neg_inf = bits
    return int(a.view(signed).max()) < pos_inf and int(a.view(unsigned).max()) < neg_inf


def check_finite(a: np.ndarray, clip: str, what: str) -> None:
    """A :class:`CacheError` naming ``clip`` when ``a`` (its ``what``) holds NaN or ±inf."""
    if not all_finite(a):
        raise CacheError(f"clip {clip}: {what} hold NaN or infinite values; nothing of the shard is written")


def to_float16(frames: np.ndarray, clip: str) -> np.ndarray:
    """Cast to float16, refusing values float16 cannot hold (no silent infinities)."""
    finfo = np.finfo(np.float16)
    check_finite(frames, clip, "the upstream's hidden states")
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
        if self.dtype == np.float16:
            arr = to_float16(frames, name)
        else:
            arr = frames.astype(np.float32)
            check_finite(arr, name, "the upstream's hidden states (as float32)")
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
            check_finite(p, name, "the pooled statistics")
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
