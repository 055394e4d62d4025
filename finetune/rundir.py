"""The model directory a fine-tuning run writes into: claiming it (lock, resume or start
over), its checkpoints and, at the end, its outputs (predictions, metrics.json, the model).

While training, ``out`` holds ``config.json`` and ``checkpoints/last.pt`` (model, optimiser,
random streams, batch plan, history: :func:`checkpoint`) and ``checkpoints/best.pt``; a
finished run adds ``predictions/``, ``metrics.json`` and the model directory's files
(:func:`conilium.finetune.model.save_model_dir`), ``conilium_model.json`` last.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from torch import nn
from tqdm import tqdm

from conilium import errors as _errors
from conilium.errors import ConfigError
from conilium.locking import DirectoryLock, lock_directory
from conilium.dirs import ModelDir
from conilium.runs import write_run_outputs
from conilium.runtime import Dist
from conilium.targets import class_counts
from conilium.training.config import differing_fields
from conilium.training.loop import stage_summary
from conilium.training.state import Checkpoint
from conilium.util import check_writable

from .config import RESUMABLE_FIELDS, FinetuneConfig
from .model import EndToEndModel, save_model_dir

if TYPE_CHECKING:  # the run's parts, made by conilium.finetune.train
    from .train import Built, Prepared

CHECKPOINT_DIR = ModelDir.CHECKPOINTS
LAST = Path(ModelDir.LAST_CHECKPOINT).name
BEST = "best.pt"
#: the best epoch of the class-balanced second stage (``--balanced-stage``), when it beats best.pt
BEST_STAGE2 = "best-stage2.pt"
TUNED_DIR = "tuned"


#: the way out of a damaged last checkpoint
_DAMAGED = ("the last epoch's checkpoint is damaged (a full disk, a copy cut short?); start over with --overwrite, "
            "or put back a good copy of it to --resume")


def checkpoint_paths(out: Path) -> Tuple[Path, Path]:
    """``out``'s last and best checkpoints."""
    model_dir = ModelDir(out)
    return model_dir.last_checkpoint, model_dir.checkpoint_dir / BEST


def output_bytes(model: nn.Module, *, resuming: bool, balanced_stage: bool = False) -> int:
    """About the most bytes the checkpoints and the model directory take on disk at once:
    best.pt and last.pt (the weights, and the optimizer's two moments of the trained ones)
    with a new last.pt being written beside them, then the model directory. A resumed run
    already has its checkpoints."""
    every = sum(p.numel() for p in model.parameters()) * 4
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
    stage = every if balanced_stage else 0  # best-stage2.pt
    if resuming:
        return 2 * every + 2 * trained + stage + (1 << 20)
    return 3 * every + 4 * trained + stage + (1 << 20)


def check_out_dir(out: Path, config: FinetuneConfig, resume: bool, overwrite: bool) -> Tuple[Optional[Checkpoint], bool]:
    """What to do with ``out``: ``(checkpoint to resume from or None, whether to clear it first)``.

    With ``resume`` and no completed epoch yet (no checkpoint, no finished model), the run
    starts afresh, so a script may always pass ``--resume``.
    """
    model_dir = ModelDir(out)
    last, _ = checkpoint_paths(out)
    has_model = model_dir.is_model()
    has_ckpt = last.is_file()
    has_run = has_model or has_ckpt or model_dir.has_config()
    if model_dir.has_config() and not overwrite:
        if model_dir.kind != "finetune":
            raise ConfigError(f"{out} holds a config.json that finetune-best did not write (another kind of run?); "
                              f"choose another --out, or replace it with --overwrite")
    if resume and not overwrite:
        if not has_ckpt:
            if has_model:
                raise ConfigError(f"--resume: {out} holds a finished model whose checkpoints were removed; "
                                  f"use --keep-checkpoints to be able to continue a finished run, or --overwrite "
                                  f"to train again")
            return None, has_run  # nothing completed yet: start (again) from the beginning
        ckpt = Checkpoint.load(last, way_out=_DAMAGED)
        saved = FinetuneConfig.from_dict(ckpt.config).to_json()  # options added since: their defaults
        now = config.to_json()
        diff = differing_fields(FinetuneConfig, saved, now, ignore=RESUMABLE_FIELDS)
        if diff:
            raise ConfigError(f"--resume: {out} was started with other settings ({', '.join(diff)}: "
                              + "; ".join(f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in diff)
                              + "); resume with the same options, or start over with --overwrite")
        return ckpt, False
    if has_run and not overwrite:
        raise ConfigError(f"{out} already holds a fine-tuning run; continue it with --resume, choose another "
                          f"--out, or start over with --overwrite")
    return None, has_run


def claim_out_dir(out: Path, config: FinetuneConfig, d: Dist, *, resume: bool, overwrite: bool,
                   wait_for_lock=False, progress: bool = False) -> Tuple[Optional[Checkpoint], Optional[DirectoryLock]]:
    """Lock ``out`` on rank 0, check it (writable; clear it when starting over) and return the
    checkpoint to resume from and the lock (None on the other ranks)."""
    state: dict = {}

    def claim() -> bool:
        on_wait = (lambda m: tqdm.write(m)) if progress else None
        lock = lock_directory(out, what="finetune-best model directory", wait=wait_for_lock,
                              on_wait=on_wait).acquire()
        try:
            check_writable(out, what="finetune-best model directory")
            state["ckpt"], state["clear"] = check_out_dir(out, config, resume, overwrite)
        except BaseException:
            lock.release()
            raise
        state["lock"] = lock
        return state["ckpt"] is not None

    resuming = d.on_main(claim, share=True)
    ckpt, clear, lock = state.get("ckpt"), state.get("clear", False), state.get("lock")
    if resuming and not d.main:
        ckpt = Checkpoint.load(checkpoint_paths(out)[0], way_out=_DAMAGED)
    if d.main and not resuming:
        if clear:
            for p in (ModelDir.MARKER, ModelDir.METRICS, ModelDir.HEAD, ModelDir.CONFIG):
                (out / p).unlink(missing_ok=True)
            for p in (ModelDir.CHECKPOINTS, ModelDir.PREDICTIONS, ModelDir.UPSTREAM, ModelDir.ADAPTER, TUNED_DIR):
                shutil.rmtree(out / p, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()
    return ckpt, lock


def write_model_dir(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device,
                     history: List[dict], best: dict, train_seconds: float, split_predictions: dict, out: Path,
                     model: EndToEndModel) -> dict:
    """Rank 0: predictions, metrics.json and the model directory; on a failure to write, none of
    them is left (no metrics.json, no conilium_model.json; the checkpoints stay, so that
    ``--resume`` writes them again once the problem is solved)."""
    try:
        return _write_outputs(config, prep, b, d, device, history, best, train_seconds, split_predictions, out,
                              model)
    except BaseException as e:
        for name in (ModelDir.METRICS, ModelDir.MARKER, ModelDir.HEAD):
            with contextlib.suppress(OSError):
                (out / name).unlink(missing_ok=True)
        for name in (ModelDir.PREDICTIONS, ModelDir.UPSTREAM, ModelDir.ADAPTER):
            shutil.rmtree(out / name, ignore_errors=True)
        if isinstance(e, _errors.OutputError) and (out / CHECKPOINT_DIR / LAST).is_file():
            raise _errors.OutputError(e.path, e.reason, (e.hint + "; " if e.hint else "") +
                                      f"the checkpoints in {out / CHECKPOINT_DIR} are kept: finetune-best "
                                      f"--resume then writes the model directory without training again") from e
        raise


def _write_outputs(config: FinetuneConfig, prep: Prepared, b: Built, d: Dist, device: torch.device,
                   history: List[dict], best: dict, train_seconds: float, split_predictions: dict, out: Path,
                   model: EndToEndModel) -> dict:
    classes = prep.corpus.classes
    training = {
        "clips": len(prep.train),
        "class_counts": dict(zip(classes.codes, class_counts([c.emo_class for c in prep.train], classes).tolist())),
        "dropped": prep.train_counts,
        "class_weights": None if prep.weights is None else dict(zip(classes.codes, prep.weights.tolist())),
        "sampler": config.sampler,
        "epochs_run": len(history),
        "seconds_this_session": round(train_seconds, 3),
        "world_size": d.world,
        "device": str(device),
        "start_from": b.start_from,
        "augment_noise": config.augment_noise,
        "optimizer": b.optimizer_name,
    }
    if b.lora:
        training["lora"] = dict(b.lora, trainable_parameters=sum(p.numel() for p in model.parameters()
                                                                  if p.requires_grad))
    if config.mixup:
        training["mixup"] = config.mixup
    if config.balanced_stage:
        training["balanced_stage"] = stage_summary(history, "dev_f1_macro", best["epoch"], config.balanced_stage)
    extra = {"training": training, "kind": "finetune"}
    if b.aux_scores is not None:
        extra["aux"] = b.aux_scores
    if not classes.is_default:
        extra["classes"] = classes.to_json()
    metrics = write_run_outputs(out, split_predictions, history, best["epoch"], dev_split=config.dev_split,
                                extra=extra, classes=classes.codes)
    save_model_dir(out, model, {
        "max_seconds": b.signal.max_seconds,
        "normalize": {"mode": b.signal.normalize, "stats": b.signal.stats},
        "rescale_loud": b.signal.rescale_loud,
        "offsets": {c: 0.0 for c in classes.codes},
        **({} if classes.is_default else {"classes": list(classes.codes), "class_set": classes.to_json()}),
        "thresholds": None,
        "loss": config.loss,
        "labels": config.labels,
        "upstream": b.identity,
        "best_epoch": best["epoch"],
        "dev_f1_macro": best["f1_macro"],
        "start_from": b.start_from,
        "lora": b.lora,
    })
    if not config.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return metrics
