"""Feeding a head from a feature cache: layer selection, a torch Dataset, batching.

A head reads either a clip's frames ((T, layers, dim)) or its per-layer utterance
statistics ((all layers, 2, dim)) from the cache.
:func:`select_input` turns the user's ``layers`` choice into what to read:

* ``"weighted"``: every stored layer (frames) or every layer (statistics), mixed by the
  head's learnable softmax weights;
* an int ``k >= 0``: the upstream's hidden state ``k`` (0 = CNN output), which the cache
  must hold; a negative int counts from the last available layer. Only that layer is
  read from disk (the shards keep each layer's frames contiguous).

:class:`ClipDataset` streams clips from the shards (or from memory when preloaded) and
:func:`collate` pads each batch to its longest clip, returning the valid lengths so that
pooling ignores the padding. Peak memory is then one batch (per DataLoader worker),
whatever the size of the cache. What a directory passed as a cache is (a run, a model, a
corpus: :func:`check_cache_dir`) is told by :mod:`conilium.dirs`; this module re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from conilium.cache.reader import FeatureCache
from conilium.errors import CacheError, ConfigError

GIB = 1024 ** 3


@dataclass(frozen=True)
class InputSelection:
    """What a head reads from the cache.

    ``kind`` is ``"frames"`` or ``"pooled"``; ``positions`` the positions on the stored
    layer axis to read (None: all of them); ``upstream_layers`` the upstream's hidden-state
    index of each layer read, in order.
    """

    kind: str
    positions: Optional[Tuple[int, ...]]
    upstream_layers: Tuple[int, ...]
    dim: int

    @property
    def num_layers(self) -> int:
        return len(self.upstream_layers)

    def to_json(self) -> dict:
        return {"kind": self.kind, "positions": None if self.positions is None else list(self.positions),
                "upstream_layers": list(self.upstream_layers), "dim": self.dim}


def pooled_num_layers(cache: FeatureCache) -> int:
    """Number of layers in the cache's pooled statistics (all the upstream's hidden states)."""
    if not cache.has_pooled:
        raise ConfigError(f"{cache.path}: the cache holds no pooled statistics, so --pooled-stats cannot be "
                          f"used; extract the features again with --pooled-stats, or drop --pooled-stats")
    if not cache.names:
        raise CacheError(f"{cache.path}: the cache holds no clip")
    return int(cache.pooled(cache.names[0]).shape[0])


def parse_layers(value: Union[str, int]) -> Union[str, int]:
    """``"weighted"`` or an int, from a command-line or JSON value."""
    if isinstance(value, bool):
        raise ConfigError(f"--layers must be 'weighted' or a layer number, not {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text == "weighted":
        return "weighted"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--layers must be 'weighted' or a layer number (e.g. 12, or -1 for the last), "
                          f"not {value!r}") from None


def select_input(cache: FeatureCache, layers: Union[str, int] = "weighted", pooled_stats: bool = False) -> InputSelection:
    """Resolve ``layers`` against what the cache holds; a clear error when it cannot be read."""
    layers = parse_layers(layers)
    if pooled_stats:
        available = list(range(pooled_num_layers(cache)))
        what = "pooled statistics of layers"
    else:
        available = cache.layers
        what = "frames of upstream layer(s)"
    if not available:
        raise CacheError(f"{cache.path}: the manifest lists no layer")
    if layers == "weighted":
        return InputSelection("pooled" if pooled_stats else "frames", None, tuple(available), cache.dim)
    k = int(layers)
    if k >= 0:
        if k not in available:
            raise ConfigError(f"--layers {k}: the cache holds {what} {_ranges(available)} only; "
                              f"choose one of them or --layers weighted")
        pos = available.index(k)
    else:
        if -k > len(available):
            raise ConfigError(f"--layers {k}: out of range, the cache holds {len(available)} layer(s) "
                              f"({what} {_ranges(available)})")
        pos = len(available) + k
    return InputSelection("pooled" if pooled_stats else "frames", (pos,), (available[pos],), cache.dim)


def _ranges(values: Sequence[int]) -> str:
    v = list(values)
    if len(v) > 2 and v == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}..{v[-1]}"
    return ", ".join(str(x) for x in v)


def check_clips(cache: FeatureCache, names: Sequence[str], selection: InputSelection) -> None:
    """Refuse clips with no frame (attention over nothing is undefined)."""
    if selection.kind != "frames":
        return
    empty = [n for n in names if cache.num_frames(n) <= 0]
    if empty:
        raise CacheError(f"{cache.path}: clip(s) with no frame: {', '.join(empty[:5])}"
                         f"{' …' if len(empty) > 5 else ''}; rebuild the cache or drop these clips")


def frame_itemsize(cache: FeatureCache) -> int:
    return 4 if str(cache.manifest.get("dtype", "float16")) == "float32" else 2


def feature_bytes(cache: FeatureCache, names: Sequence[str], selection: InputSelection) -> int:
    """Bytes the selected features of ``names`` take in memory (as stored: float16 or float32)."""
    if selection.kind == "pooled":
        return len(names) * selection.num_layers * 2 * selection.dim * 4
    frames = sum(cache.num_frames(n) for n in names)
    return frames * selection.num_layers * selection.dim * frame_itemsize(cache)


class ClipDataset(Dataset):
    """Clips of a cache as ``(features, target, index)``.

    ``features`` is a float tensor (T, layers, dim) of frames or (layers, 2·dim) of pooled
    statistics (mean ‖ std). ``targets`` (N, C) may be None (prediction only): the target
    is then an empty tensor. ``preload`` reads everything into memory once (as stored,
    float16 frames stay float16); otherwise each item is read from its shard on demand.
    """

    def __init__(self, cache: FeatureCache, names: Sequence[str], selection: InputSelection,
                 targets: Optional[np.ndarray] = None, *, preload: bool = False, progress: bool = False,
                 desc: str = "loading features"):
        self.cache = cache
        self.names = list(names)
        self.selection = selection
        if targets is not None and len(targets) != len(self.names):
            raise ValueError(f"{len(targets)} targets for {len(self.names)} clips")
        self.targets = None if targets is None else torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self._memory: Optional[List[np.ndarray]] = None
        if preload:
            self._memory = self._read_all(progress, desc)

    @property
    def preloaded(self) -> bool:
        return self._memory is not None

    def _read_all(self, progress: bool, desc: str) -> List[np.ndarray]:
        """Every clip's features; neighbouring clips of a shard are read together."""
        sel = self.selection
        with tqdm(total=len(self.names), desc=desc, unit="clip", disable=not progress, leave=False) as bar:
            if sel.kind == "pooled":
                out = []
                for n in self.names:
                    out.append(self._read(n))
                    bar.update()
                return out
            dtype = np.float16 if frame_itemsize(self.cache) == 2 else np.float32
            layer = None if sel.positions is None else sel.positions[0]
            out = []
            for _, x in self.cache.iter_frames(self.names, layer=layer, dtype=dtype):
                out.append(x)
                bar.update()
            return out

    def _read(self, name: str) -> np.ndarray:
        sel = self.selection
        if sel.kind == "pooled":
            p = self.cache.pooled(name)  # (L_all, 2, D)
            if sel.positions is not None:
                p = p[list(sel.positions)]
            return np.ascontiguousarray(p.reshape(p.shape[0], -1), dtype=np.float32)
        dtype = np.float16 if frame_itemsize(self.cache) == 2 else np.float32
        if sel.positions is None:
            return self.cache.frames(name, dtype=dtype)
        return self.cache.frames(name, layer=sel.positions[0], dtype=dtype)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        x = self._memory[i] if self._memory is not None else self._read(self.names[i])
        y = self.targets[i] if self.targets is not None else torch.empty(0)
        return torch.from_numpy(x), y, i


class FusionDataset(Dataset):
    """The same clips in several caches (a fusion run's): item ``i`` is the tuple of each part's
    features of clip ``i``. ``cache``, ``names`` and ``selection`` are the first (primary) part's."""

    def __init__(self, parts: Sequence[ClipDataset]):
        self.parts = list(parts)
        if len({len(p) for p in self.parts}) != 1:
            raise ValueError(f"fusion parts of different lengths: {[len(p) for p in self.parts]}")
        self.cache, self.names, self.selection = self.parts[0].cache, self.parts[0].names, self.parts[0].selection

    @property
    def preloaded(self) -> bool:
        return all(p.preloaded for p in self.parts)

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, i: int):
        return tuple(p[i][0] for p in self.parts), torch.empty(0), i


def collate(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Pad a list of ``(features, target, index)`` into ``(x, lengths, targets, indices)``.

    Frames become a (B, T_max, layers, dim) tensor, zero-padded, in their stored dtype
    (float16 frames stay float16: half the bytes to move between loader workers and to
    the GPU; the caller casts to float32 on the device), with ``lengths`` the valid frame
    counts; pooled statistics are stacked to (B, layers, 2·dim) and ``lengths`` is None.
    """
    xs, ys, idx = zip(*batch)
    targets = torch.stack(ys)
    indices = torch.as_tensor(idx, dtype=torch.long)
    if xs[0].dim() == 2:
        return torch.stack(list(xs)), None, targets, indices
    lengths = torch.as_tensor([x.shape[0] for x in xs], dtype=torch.long)
    t_max = int(lengths.max())
    out = torch.zeros((len(xs), t_max) + tuple(xs[0].shape[1:]), dtype=xs[0].dtype)
    for i, x in enumerate(xs):
        out[i, : x.shape[0]] = x
    return out, lengths, targets, indices


def length_batches(cache: FeatureCache, names: Sequence[str], batch_size: int, selection: InputSelection) -> List[List[int]]:
    """Index batches of similar lengths (for prediction: less padding, same results)."""
    if selection.kind == "pooled":
        order = list(range(len(names)))
    else:
        order = sorted(range(len(names)), key=lambda i: cache.num_frames(names[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

