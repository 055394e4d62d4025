"""Random streams and checkpoint files of a training run.

* :func:`seed_epoch`: the draws of an epoch (dropout, LayerDrop, SpecAugment) depend on
  (seed, epoch, rank) only, so that a resumed run goes on as an uninterrupted one;
* :func:`rng_state` / :func:`set_rng_state`: every generator a run draws from, to keep in a
  checkpoint;
* :class:`RandomStream`: a model's own copy of the global random stream, swapped in around
  its step, so that models trained side by side draw what each would draw alone;
  :data:`GLOBAL_RNG_LOCK` keeps runs trained at the same time in threads of one process
  (train-grid's threading backend) from drawing from that one stream in between;
* :func:`save_atomic` / :func:`cpu_state`: checkpoints written whole or not at all;
* :class:`Checkpoint`: the state a run continues from, read back with a clear error for a
  damaged file.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

import numpy as np
import torch

from conilium.errors import TrainingError
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


#: Held by a thread that seeds or draws from torch's global random stream for a run (a head's
#: initialisation, a step's dropout): another run's thread in the same process waits, and its
#: draws never fall between them. Re-entrant.
GLOBAL_RNG_LOCK = threading.RLock()


class RandomStream:
    """A model's own copy of the global random stream (CPU, and the device's on CUDA), swapped
    in around its training step: dropout then draws what it would draw in the model's run alone.
    Made right after the model's initialisation, as a run alone goes on (both under
    :data:`GLOBAL_RNG_LOCK`); holds the lock while it is swapped in."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = None if self.device is None else torch.cuda.get_rng_state(self.device)

    def __enter__(self):
        GLOBAL_RNG_LOCK.acquire()
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc):
        try:
            self.cpu = torch.get_rng_state()
            if self.device is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
        finally:
            GLOBAL_RNG_LOCK.release()


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then renamed: a checkpoint is whole or absent."""
    with atomic_path(path, suffix=".pt.tmp") as tmp:
        torch.save(obj, tmp)


def cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of ``module``'s weights on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@dataclass
class Checkpoint:
    """What a run continues from after an interruption (``checkpoints/last.pt``): the model's
    and the optimiser's state, the history and best epoch, every rank's random streams, the
    batch plan's position (``sampler``: seed, next epoch, sizes) and the run's config;
    ``extra`` holds what a kind of run adds (fine-tuning: its waveform normalisation). The
    file keeps these as one dict of plain keys, as earlier versions wrote it."""

    config: dict
    model: Dict[str, torch.Tensor]
    optimizer: dict
    history: List[dict]
    best: dict  # {"f1_macro": value, "epoch": n}
    sampler: dict  # {"seed", "next_epoch", ...}
    rng: Dict[int, dict] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    KEYS = ("config", "model", "optimizer", "history", "best", "sampler")

    @property
    def next_epoch(self) -> int:
        return int(self.sampler["next_epoch"])

    def save(self, path: Path) -> None:
        """Written whole or not at all (:func:`save_atomic`)."""
        save_atomic({**self.extra, "config": self.config, "model": self.model, "optimizer": self.optimizer,
                     "history": self.history, "best": self.best, "rng": self.rng, "sampler": self.sampler}, path)

    @classmethod
    def load(cls, path: Path, *, way_out: str = "") -> "Checkpoint":
        """Read ``path``; a file that cannot be read (truncated, not a checkpoint) or lacks a part is a
        :class:`~conilium.errors.TrainingError` naming it and ``way_out``."""
        path = Path(path)
        hint = f"; {way_out}" if way_out else ""
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise TrainingError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {e}){hint}") from None
        missing = [k for k in cls.KEYS if not isinstance(data, dict) or k not in data]
        if missing:
            raise TrainingError(f"{path}: not a training checkpoint (no {', '.join(missing)}){hint}")
        extra = {k: v for k, v in data.items() if k not in cls.KEYS + ("rng",)}
        return cls(**{k: data[k] for k in cls.KEYS}, rng=dict(data.get("rng") or {}), extra=extra)
