"""The one training loop of conilium: epochs, best-epoch selection, patience, history, the
non-finite-loss stop and the optimiser policy, for head runs and end-to-end fine-tuning alike.

A kind of run is a :class:`Recipe`: it says where an epoch's batches come from, what one
training step computes (:meth:`Recipe.fit_batch`), how the development split is scored
and what happens at the end of an epoch (keep the best weights, write a checkpoint).
:func:`fit` runs the epochs over one or more :class:`Trainee` (a model with its
optimiser and its bookkeeping) that read the same batches::

    for epoch in epochs:
        for batch in recipe.epoch_batches(epoch):          # read once for every trainee
            losses = recipe.fit_step(active, batch)             # each trainee's step (or all at once)
            stop a trainee whose loss is not finite         # one read-back per step
        dev = recipe.evaluate(scored, epoch)                # one pass for every trainee
        each trainee: history record, best epoch, patience, recipe.on_epoch_end(...)

The heads' recipe (:mod:`conilium.heads.train`) trains many heads over one pass of the
cached features; fine-tuning's (:mod:`conilium.finetune.train`) one model over audio,
under ``torchrun`` too, with checkpoints to resume from.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from conilium.errors import TrainingError


def make_optimizer(params, *, lr: float, weight_decay: float,
                   capturable: bool = False) -> Tuple[torch.optim.Optimizer, str]:
    """AdamW over ``params``, and the implementation's name.

    The fused implementation (one kernel for every tensor, on CPU and CUDA where torch has
    it) instead of the per-tensor loop, which took 14–17 % of a CPU head epoch; its
    updates differ from the loop's in the last bits of float32 rounding (≈6e-8 after 30
    steps on a head's weights). Without it: the foreach implementation, bitwise equal to
    the loop. ``capturable``: the step counts kept on the device, so that a CUDA graph can hold
    the update (:mod:`conilium.heads.graphs`; CUDA parameters only).
    """
    params = list(params)
    extra = {"capturable": True} if capturable else {}
    what = " capturable" if capturable else ""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **extra), f"AdamW (fused{what})"
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True, **extra),
                f"AdamW (foreach{what})")


def nonfinite_error(loss: str, value, *, epoch: int, step: int, lr: float, hint: str) -> TrainingError:
    """The error that stops a run whose loss is NaN or infinite (``value``: the value, or
    None where only "not finite" is known)."""
    what = "not finite" if value is None else str(value)
    return TrainingError(f"training stopped: the {loss} loss is {what} at epoch {epoch}, step {step} "
                         f"(lr {lr}); lower --lr, or {hint}")


class Selection:
    """Best-epoch bookkeeping: the epoch with the highest ``metric`` (a history key) is
    kept; with ``patience``, training stops after that many epochs without a better one."""

    def __init__(self, metric: str, patience: Optional[int], *, best_value: float = -math.inf,
                 best_epoch: int = 0, since_best: int = 0):
        self.metric, self.patience = metric, patience
        self.best_value, self.best_epoch, self.since_best = best_value, best_epoch, since_best

    @classmethod
    def resumed(cls, metric: str, patience: Optional[int], history: Sequence[dict], best_value: float,
                best_epoch: int) -> "Selection":
        """The bookkeeping of a run continued after ``history`` (epochs since the best counted)."""
        since = sum(1 for r in history if r["epoch"] > best_epoch)
        return cls(metric, patience, best_value=best_value, best_epoch=best_epoch, since_best=since)

    def update(self, record: dict) -> bool:
        """Take an epoch's history record; True when it is the best so far."""
        value = record[self.metric]
        if value > self.best_value:
            self.best_value, self.best_epoch, self.since_best = value, record["epoch"], 0
            return True
        self.since_best += 1
        return False

    @property
    def exhausted(self) -> bool:
        """True when the patience ran out."""
        return self.patience is not None and self.since_best >= self.patience


class Trainee:
    """One model trained by :func:`fit`: its optimiser, epochs, selection and history."""

    def __init__(self, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int,
                 selection: Selection, optimizer_name: str = "", history: Optional[List[dict]] = None):
        self.name, self.model, self.optimizer, self.optimizer_name = name, model, optimizer, optimizer_name
        self.epochs, self.selection = epochs, selection
        self.history: List[dict] = list(history or [])
        self.error: Optional[BaseException] = None
        self.total, self.seen = 0.0, 0
        # a later stage (:func:`begin_stage`): its epochs are numbered on from the last one recorded,
        # and their records say the stage
        self.stage, self.epoch_offset = 1, 0

    def trains(self, epoch: int) -> bool:
        return self.error is None and not self.selection.exhausted and epoch <= self.epochs

    @property
    def best_epoch(self) -> int:
        return self.selection.best_epoch

    def end_epoch(self, epoch: int, train_loss: float, dev: dict, train_seconds: float,
                  seconds: float) -> Tuple[dict, bool]:
        """Record the epoch in the history; (the record, whether it is the best so far)."""
        record = {"epoch": epoch + self.epoch_offset, "train_loss": train_loss, **dev,
                  "train_seconds": round(train_seconds, 3), "seconds": round(seconds, 3)}
        if self.stage > 1:
            record["stage"] = self.stage
        self.history.append(record)
        self.total, self.seen = 0.0, 0
        return record, self.selection.update(record)


def freeze_all_but(model: torch.nn.Module, keep: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Stop the gradients of every parameter of ``model`` outside ``keep`` (a submodule); the
    parameters of ``keep``, which go on training."""
    kept = list(keep.parameters())
    ids = {id(p) for p in kept}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return kept


def begin_stage(trainee: Trainee, optimizer: torch.optim.Optimizer, *, epochs: int, stage: int = 2,
                optimizer_name: str = "") -> None:
    """Make ``trainee`` ready for another :func:`fit` (a further stage of training): ``epochs`` more
    epochs, numbered on from the last one of its history and recorded with ``"stage": stage``,
    with ``optimizer``. The best epoch so far stays the one to beat (an epoch of this stage is
    kept only when strictly better); patience counts afresh."""
    trainee.epoch_offset = trainee.history[-1]["epoch"] if trainee.history else 0
    trainee.stage = stage
    trainee.optimizer = optimizer
    if optimizer_name:
        trainee.optimizer_name = optimizer_name
    trainee.epochs = epochs
    trainee.selection.since_best = 0


def stage_summary(history: Sequence[dict], metric: str, best_epoch: int, epochs: int) -> dict:
    """What metrics.json records of a class-balanced second stage of ``epochs`` epochs: its epochs
    run, the best ``metric`` of each stage, and which stage the kept epoch (``best_epoch``) is of."""
    first = [r for r in history if r.get("stage", 1) == 1]
    second = [r for r in history if r.get("stage", 1) == 2]
    best1 = max((r[metric] for r in first), default=None)
    best2 = max((r[metric] for r in second), default=None)
    won = 2 if any(r["epoch"] == best_epoch for r in second) else 1
    return {"epochs": epochs, "epochs_run": len(second), "metric": metric, "stage1_best": best1,
            "stage2_best": best2, "best_stage": won, "best_epoch": best_epoch}


class Recipe:
    """What a kind of run computes; :func:`fit` calls these, a recipe overrides what differs."""

    #: what a non-finite loss message advises besides a lower learning rate
    nonfinite_hint = "check the input data"

    def epoch_batches(self, epoch: int) -> Tuple[Iterable, int]:
        """The training batches of ``epoch`` and how many there are."""
        raise NotImplementedError

    def fit_batch(self, trainee: Trainee, batch, *, epoch: int, step: int) -> List[Tuple[torch.Tensor, int]]:
        """One optimiser step of ``trainee`` on ``batch``: each forward pass's loss (detached,
        still on the device) and its number of clips."""
        raise NotImplementedError

    def fit_step(self, trainees: Sequence[Trainee], batch, *, epoch: int,
                 step: int) -> List[List[Tuple[torch.Tensor, int]]]:
        """One optimiser step of each of ``trainees`` on ``batch``: for each, what
        :meth:`fit_batch` returns. By default each trainee's :meth:`fit_batch` in turn; a recipe
        that computes its trainees together (stacked heads) overrides it."""
        return [self.fit_batch(t, batch, epoch=epoch, step=step) for t in trainees]

    def loss_name(self, trainee: Trainee) -> str:
        raise NotImplementedError

    def hint_for(self, trainee: Trainee, part: int) -> str:
        """What the message of a non-finite loss of forward pass ``part`` of the last step advises
        besides a lower learning rate (by default :attr:`nonfinite_hint`)."""
        return self.nonfinite_hint

    def lr(self, trainee: Trainee) -> float:
        return trainee.optimizer.param_groups[0]["lr"]

    def reduce_loss(self, total: float, seen: int) -> Tuple[float, int]:
        """An epoch's loss sum and clip count over every process (one process: as they are)."""
        return total, seen

    def evaluate(self, trainees: Sequence[Trainee], epoch: int) -> List[dict]:
        """Each trainee's development entries of the history (``dev_…``), one pass for all."""
        raise NotImplementedError

    def on_epoch_end(self, trainee: Trainee, record: dict, improved: bool) -> None:
        """After the epoch is recorded: keep the best weights, write checkpoints, report."""


def _count(trainee: Trainee, recipe: Recipe, values: Sequence[float], sizes: Sequence[int], *, epoch: int,
           step: int) -> None:
    for part, (value, n) in enumerate(zip(values, sizes)):
        if not math.isfinite(value):
            trainee.error = nonfinite_error(recipe.loss_name(trainee), value, epoch=epoch, step=step,
                                            lr=recipe.lr(trainee), hint=recipe.hint_for(trainee, part))
            return
        trainee.total += value * n
        trainee.seen += n


def _train_epoch(recipe: Recipe, active: List[Trainee], epoch: int, *, epochs: int, progress: bool) -> None:
    for t in active:
        t.model.train()
    batches, n = recipe.epoch_batches(epoch)
    steps = tqdm(batches, total=n, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not progress)
    for step, batch in enumerate(steps, start=1):
        parts = recipe.fit_step(active, batch, epoch=epoch, step=step)
        # one read-back from the device per step for every trainee (finite check, running loss)
        values = torch.stack([loss.float() for p in parts for loss, _ in p]).tolist()
        at = 0
        for t, p in zip(active, parts):
            _count(t, recipe, values[at: at + len(p)], [size for _, size in p], epoch=epoch, step=step)
            at += len(p)
        active = [t for t in active if t.error is None]
        if not active:
            break
        if len(active) == 1:
            steps.set_postfix(loss=f"{active[0].total / max(active[0].seen, 1):.4f}")
    steps.close()


def fit(recipe: Recipe, trainees: Sequence[Trainee], *, first_epoch: int = 1, progress: bool = True,
        desc: str = "epochs", on_epoch: Optional[Callable[[int, int], None]] = None) -> None:
    """Train ``trainees`` from ``first_epoch`` on, until their epochs or patience run out;
    ``on_epoch(epoch, last)`` after each epoch (``last``: the most epochs any trainee may train).

    A trainee whose loss stops being finite gets its error (``trainee.error``) and the
    others go on; an exception of the recipe (a failing read, another process's error)
    stops them all.
    """
    last = max(t.epochs for t in trainees)
    bar = tqdm(range(first_epoch, last + 1), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        active = [t for t in trainees if t.trains(epoch)]
        if not active:
            break
        t0 = time.time()
        _train_epoch(recipe, active, epoch, epochs=last, progress=progress)
        train_seconds = time.time() - t0
        scored = [t for t in trainees if t.trains(epoch)]
        if not scored:
            continue
        devs = recipe.evaluate(scored, epoch)
        for t, dev in zip(scored, devs):
            total, seen = recipe.reduce_loss(t.total, t.seen)
            record, improved = t.end_epoch(epoch, total / max(seen, 1), dev, train_seconds, time.time() - t0)
            recipe.on_epoch_end(t, record, improved)
        if on_epoch is not None:
            on_epoch(epoch, last)
        if len(trainees) == 1:
            t = trainees[0]
            sel = t.selection
            bar.set_postfix({"loss": f"{t.history[-1]['train_loss']:.4f}",
                             sel.metric.replace("_macro", "").replace("_mean", ""): f"{t.history[-1][sel.metric]:.3f}",
                             "best": f"{sel.best_value:.3f}@{sel.best_epoch}"})
    bar.close()
