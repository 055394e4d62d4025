"""The class-balanced sampler of the paper's section 3.4.

Each training clip is drawn with probability proportional to 1 / f(its consensus class),
with replacement, ``len(clips)`` draws per epoch, so that every class is drawn about
equally often. With the sampler on, the loss's class weights are off: the sampler
already accounts for the class frequencies.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from conilium import CLASSES
from conilium.errors import ConfigError


def balanced_weights(labels: Sequence[str], classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Per-clip draw weight 1 / f(class of the clip), f the class's count among ``labels``
    (``classes``: the target classes, MSP-Podcast's eight by default)."""
    labels = list(labels)
    classes = tuple(classes)
    bad = sorted({c for c in labels if c not in classes}, key=str)
    if bad:
        raise ConfigError(f"balanced sampler: consensus label(s) {bad} are not target classes")
    values, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    freq = dict(zip(values.tolist(), counts.tolist()))
    return np.array([1.0 / freq[c] for c in labels], dtype=np.float64)


def balanced_sampler(labels: Sequence[str], *, num_samples: Optional[int] = None,
                     generator: Optional[torch.Generator] = None,
                     classes: Sequence[str] = CLASSES) -> WeightedRandomSampler:
    """A sampler drawing ``num_samples`` (default: as many as clips) indices, classes balanced."""
    w = balanced_weights(labels, classes)
    return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), num_samples or len(w),
                                 replacement=True, generator=generator)
