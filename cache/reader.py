"""Reading a feature cache: :class:`FeatureCache`.

Opening checks the manifest (:meth:`conilium.dirs.CacheDir.read_manifest`) and clips.json
against it; each shard's index is read once (:func:`conilium.cache.shards.read_shard_index`)
and its frames then with plain positional reads, each clip checked against its CRC-32 and
for NaN or infinite values.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from conilium.classes import ClassSet, class_set_of
from conilium.corpus import Clip
from conilium.cachedir import VERIFY_MODES
from conilium.dirs import CacheDir, Manifest
from conilium.errors import CacheError, CorpusError

from .shards import RUN_BYTES, ShardIndex, all_finite, crc32, read_shard_index

CLIPS = CacheDir.CLIPS


def load_manifest(path) -> Manifest:
    """The manifest of the complete cache ``path``, checked against its own checksum
    (:meth:`conilium.dirs.CacheDir.read_manifest`)."""
    return CacheDir(path).read_manifest()


def read_clips(path, manifest: Mapping) -> List[dict]:
    """The records of ``path``'s clips.json, checked against the manifest's checksum of it."""
    return CacheDir(path).read_clips(manifest)


class FeatureCache:
    """Read access to a feature cache directory.

    >>> cache = FeatureCache("cache/wavlm-large")
    >>> cache.names[:2], cache.manifest["dim"]
    >>> x = cache.frames(cache.names[0])      # float32 (frames, layers, dim)

    Opening checks the manifest against its own checksum and clips.json against the
    manifest's; frames and pooled statistics are checked against the clip's CRC-32, and
    for NaN or infinite values (a faulty or foreign writer), the first time this reader
    reads them (``verify=True`` or ``"first"``, the default: a head trained for 40 epochs
    pays the checks in its first epoch only), at every read (``"always"``: also sees a
    shard rewritten while it is read), or never (``False`` or ``"never"``, for measurements
    only). A shard's index is read
    once; its frames are then read with plain positional reads of the file (no HDF5 on the
    way). At most ``max_open`` shard files stay open at once (one closed while another
    thread reads it is closed when that read ends); the reader can be shared by threads and
    handed to DataLoader workers (forked or pickled).
    """

    def __init__(self, path, *, max_open: int = 16, verify: Union[bool, str] = True):
        if verify not in VERIFY_MODES and verify not in (True, False, "once"):
            raise ValueError(f"verify must be True or 'first' (once per clip), 'always', or False or 'never', "
                             f"not {verify!r}")
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self._shards = [self.path / s["file"] for s in self.manifest.shards]
        missing = [str(p) for p in self._shards if not p.is_file()]
        if missing:
            raise CacheError(f"{self.path}: shard file(s) missing: {', '.join(missing[:5])}"
                             f"{' …' if len(missing) > 5 else ''}; run verify-cache, then extract-features to repair")
        records = read_clips(self.path, self.manifest)
        try:
            #: the class set of the corpus the cache was extracted from
            self.classes: ClassSet = class_set_of(self.manifest.get("classes"))
        except CorpusError as e:
            raise CacheError(f"{self.path}: manifest.json: classes: {e}") from None
        own = None if self.classes.is_default else self.classes
        self.clips: Dict[str, Clip] = OrderedDict()
        self._where: Dict[str, Tuple[int, int]] = {}
        self._source: Dict[str, str] = {}
        self._members: Dict[int, List[str]] = {}
        try:
            for r in records:
                name, shard = r["name"], int(r["shard"])
                self.clips[name] = Clip.from_json(r, own)
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
        self.verify = verify not in (False, "never")
        self._verify_always = verify == "always"
        self._index: Dict[int, ShardIndex] = {}
        self._reset_files()
        self._dtype = np.dtype(self.manifest.dtype)

    # ---- metadata -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.clips

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def layers(self) -> List[int]:
        """Indices (into the upstream's hidden states, 0 = CNN output) of the stored layers."""
        return self.manifest.layers

    @property
    def has_pooled(self) -> bool:
        return self.manifest.pooled_stats

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
        n = len(self.manifest.layers)
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

    def _non_finite(self, idx: ShardIndex, name: str, what: str) -> CacheError:
        return CacheError(f"{idx.path}: clip {name}: {what} hold NaN or infinite values (written so, their CRC-32 "
                          f"agrees); cache {self.path} cannot be trained or scored on: rebuild it with "
                          f"extract-features --overwrite")

    def _check(self, idx: ShardIndex, i: int, k: int, frames: np.ndarray) -> None:
        """Clip ``i``'s frames of stored layer ``k`` against its CRC-32, and for NaN or ±inf."""
        what = f"frames of layer {self.layers[k]}"
        if crc32(frames) != int(idx.crc[i, k]):
            raise self._damaged(idx, idx.names[i], what)
        if not all_finite(frames):
            raise self._non_finite(idx, idx.names[i], what)
        idx.verified[i, k] = True

    def _read_run(self, shard: int, idx: ShardIndex, first: int, last: int, positions: Sequence[int]) -> np.ndarray:
        """Frames of the shard's clips ``first..last`` (neighbours), ``(len(positions), frames, dim)``,
        one read per layer, each clip checked (:meth:`_check`)."""
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
                        self._check(idx, i, k, buf[j, s : s + int(idx.num_frames[i])])
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
            if not all_finite(out):
                raise self._non_finite(idx, name, "pooled statistics")
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
