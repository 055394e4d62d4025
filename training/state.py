"""Random streams and checkpoint files of a training run.

* :func:`seed_epoch`: the draws of an epoch (dropout, LayerDrop, SpecAugment) depend on
  (seed, epoch, rank) only, so that a resumed run goes on as an uninterrupted one;
* :func:`rng_state` / :func:`set_rng_state`: every generator a run draws from, to keep in a
  checkpoint;
* :class:`RandomStream`: a model's own copy of the global random stream, swapped in around
  its step, so that models trained side by side draw what each would draw alone;
* :func:`save_atomic` / :func:`cpu_state`: checkpoints written whole or not at all.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Mapping

import numpy as np
import torch

from conilium.util import atomic_path


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed Python, numpy and torch from (seed, epoch, rank)."""
    s = int(np.random.SeedSequence([seed, epoch, rank, 0x65706f6368]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStream:
    """A model's own copy of the global random stream (CPU, and the device's on CUDA), swapped
    in around its training step: dropout then draws what it would draw in the model's run alone.
    Made right after the model's initialisation, as a run alone goes on."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = None if self.device is None else torch.cuda.get_rng_state(self.device)

    def __enter__(self):
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc):
        self.cpu = torch.get_rng_state()
        if self.device is not None:
            self.cuda = torch.cuda.get_rng_state(self.device)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then renamed: a checkpoint is whole or absent."""
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(obj, tmp)


def cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of ``module``'s weights on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
