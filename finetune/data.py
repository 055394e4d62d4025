"""Audio batches for end-to-end training and prediction, and the batch plans.

Clips go through the one signal path (:class:`conilium.audio.SignalPath`: read →
truncate/resample → noise → normalise). An epoch is a permutation of the training clips
(or the class-balanced sampler's draws), cut into pools of ``bucket_batches`` batches
whose clips are sorted by duration, so a batch holds clips of similar length; the plan
is a pure function of the seed and the epoch. Under ``torchrun`` each global batch is
dealt out to the ranks and cut into ``grad_accum`` micro-batches.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from conilium.audio import NoiseMixer, SignalPath
from conilium.errors import AudioError, ConfigError
from conilium.extract.encoder import pad_waves

from .results import read_clip


class AudioClips(Dataset):
    """Clips through the signal path: decoded, truncated, (noise-augmented,) normalised.

    Items are keyed ``(index, epoch)`` so that augmentation is decided per epoch (no
    noise without an epoch). An item is ``(index, waveform, None, peak)``, ``peak`` being
    the largest absolute sample as read (before noise and normalisation, so that silence
    can be told from a quiet clip normalised up). A clip that cannot be read, or is
    shorter than ``min_samples``, comes back as ``(index, None, AudioError, None)``; the
    caller decides whether that stops it.
    """

    def __init__(self, paths: Sequence[Path], names: Sequence[str], *, signal: SignalPath,
                 noise: Optional[NoiseMixer] = None, durations: Optional[Sequence[float]] = None,
                 min_samples: int = 0, waves: Optional[Sequence[Optional[tuple]]] = None):
        self.paths = [Path(p) for p in paths]
        #: (samples, sample rate) given in memory for an item, in place of reading its path
        self.waves = list(waves) if waves is not None else [None] * len(self.paths)
        self.names = list(names)
        self.durations = None if durations is None else np.asarray(durations, dtype=np.float64)
        self.signal = signal
        self.noise = noise
        self.min_samples = int(min_samples)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        path, name = self.paths[index], self.names[index]
        noise = (None if self.noise is None or epoch is None else
                 functools.partial(self.noise, epoch=epoch, index=index, clip=name))
        try:
            x, peak = read_clip(self.signal, path, name, wave=self.waves[index], min_samples=self.min_samples,
                                noise=noise)
            return index, x, None, peak
        except AudioError as e:
            return index, None, e, None


def collate_waves(items) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[Tuple[int, AudioError]], List[float]]:
    """Zero-pad waveforms to the longest: ``(waves (B, N), lengths (B,), indices, errors,
    peaks)``, errors being ``(index, AudioError)`` of the items that could not be read and
    peaks the read items' largest absolute samples, in the order of ``indices``."""
    errors = [(i, e) for i, _, e, _ in items if e is not None]
    good = [(i, x, peak) for i, x, e, peak in items if e is None]
    if not good:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), [], errors, []
    waves, lengths = pad_waves([x for _, x, _ in good])
    return waves, lengths, [i for i, _, _ in good], errors, [peak for _, _, peak in good]


def epoch_batches(durations: Sequence[float], *, batch_size: int, seed: int, epoch: int,
                  bucket_batches: int = 50, draw_weights: Optional[np.ndarray] = None,
                  min_batch: int = 1) -> List[List[int]]:
    """The global batches of one epoch: lists of clip indices, clips of similar duration together.

    A permutation of the clips (or, with ``draw_weights``, as many weighted draws with
    replacement) is cut into pools of ``bucket_batches`` batches; each pool is sorted by
    duration and cut into batches of ``batch_size``; the batch order is shuffled. A
    pool's last batch with fewer than ``max(batch_size // 2, min_batch)`` clips joins the
    batch before it, so every rank and micro-batch gets a clip; the plan does not
    depend on the number of processes as long as ``min_batch <= batch_size // 2``.
    """
    durations = np.asarray(durations, dtype=np.float64)
    n = len(durations)
    rng = np.random.default_rng([seed, epoch, 0x626174636865])
    if draw_weights is not None:
        p = np.asarray(draw_weights, dtype=np.float64)
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    if n < min_batch:
        raise ConfigError(f"{n} training clip(s) cannot fill {min_batch} processes x micro-batches")
    pool = batch_size * bucket_batches
    smallest = max(batch_size // 2, min_batch)
    batches: List[List[int]] = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(durations[chunk], kind="stable")]
        cut = [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
        if len(cut[-1]) < smallest:
            if len(cut) > 1:
                cut[-2].extend(cut.pop())
            elif batches:
                batches[-1].extend(cut.pop())
        batches.extend(cut)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def rank_micro_batches(batch: Sequence[int], durations: Sequence[float], *, rank: int, world: int,
                       grad_accum: int) -> List[List[int]]:
    """This rank's micro-batches of one global batch: clips ``rank::world`` of the batch sorted by
    duration, cut into ``grad_accum`` contiguous pieces."""
    ordered = sorted(batch, key=lambda i: (durations[i], i))
    mine = ordered[rank::world]
    return [list(map(int, p)) for p in np.array_split(np.asarray(mine, dtype=np.int64), grad_accum) if len(p)]
