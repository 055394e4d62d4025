"""What a head run writes and how it is read back (see :mod:`conilium.runs`)::

    config.json               the TrainConfig
    model.pt                  the best checkpoint (:func:`load_head`)
    metrics.json              Development scores at top level, best_epoch, history, "splits"
    predictions/<Split>.csv   every split of the cache

``metrics.json`` is written last: a run directory is complete when it exists.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Tuple

import numpy as np
import torch

import conilium
from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.dirs import RunDir
from conilium.runs import write_run_outputs
from conilium.targets import ATTRIBUTE_COLUMNS, class_counts
from conilium.training.losses import activation
from conilium.util import atomic_path

from .config import TrainConfig
from .model import EmotionHead, HeadConfig

CHECKPOINT = RunDir.CHECKPOINT
CHECKPOINT_FORMAT = 1


def clear_outputs(out_dir: Path) -> None:
    run = RunDir(out_dir)
    run.metrics_path.unlink(missing_ok=True)  # first: the directory stops being complete
    run.checkpoint_path.unlink(missing_ok=True)
    shutil.rmtree(run.path / run.PREDICTIONS, ignore_errors=True)


def remove_partial_outputs(out_dir: Path) -> None:
    """After a failure to write the outputs: nothing of them is left (best effort, the disk
    may be read-only), so that no half-written run passes for one."""
    with contextlib.suppress(OSError):
        clear_outputs(out_dir)
    with contextlib.suppress(OSError):
        RunDir(out_dir).config_path.unlink(missing_ok=True)


def write_outputs(head, *, train_seconds: float, preload: bool, nbytes: int, device: torch.device) -> dict:
    """config.json, model.pt, predictions/ and, last, metrics.json."""
    config, out_dir, data = head.config, head.out_dir, head.data
    cache, sel = data.cache, data.selection
    history = head.history
    run = RunDir(out_dir)
    run.write_config(config.to_json())
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "conilium_version": conilium.__version__,
        "head_config": asdict(head.head_cfg),
        "state_dict": head.best_state,
        "loss": config.loss,
        "labels": config.labels,
        "activation": activation(config.loss),
        "classes": list(CLASSES),
        "input": sel.to_json(),
        "cache_manifest": cache.manifest.summary(),
        "train_config": config.to_json(),
        "best_epoch": head.best_epoch,
    }
    if config.task != "categories":
        checkpoint.update(task=config.task, attributes=list(ATTRIBUTE_COLUMNS), attribute_scale="(v - 1) / 6")
    with atomic_path(run.checkpoint_path, suffix=".pt.tmp") as tmp:
        torch.save(checkpoint, tmp)
    extra = {
        "training": {
            "clips": len(data.train_names),
            "class_counts": dict(zip(CLASSES, class_counts(data.train_labels).tolist())),
            "dropped": data.counts,
            "class_weights": None if data.weights is None else dict(zip(CLASSES, data.weights.tolist())),
            "sampler": config.sampler,
            "epochs_run": len(history),
            # timings are the data pass's, shared by every head trained in it
            "seconds": round(train_seconds, 3),
            # training steps only (reading, forward, backward, update), not the Development scoring
            "clips_per_second": round(len(data.train_names) * len(history)
                                      / max(sum(h["train_seconds"] for h in history), 1e-9), 2),
            "preloaded": preload,
            "feature_bytes": nbytes,
            "device": str(device),
            "optimizer": head.optimizer_name,
            "input": sel.to_json(),
        },
    }
    if config.task != "categories":
        known = int((~np.isnan(data.train_attributes).any(axis=1)).sum())
        extra["training"].update(task=config.task, attribute_clips=known,
                                 attribute_weight=config.attribute_weight if config.task == "joint" else None)
    if config.train_on_xo:
        extra["training"]["xo"] = xo_summary(data.counts)
    return write_run_outputs(out_dir, head.split_predictions, history, head.best_epoch, dev_split=config.dev_split,
                             extra=extra)


def xo_summary(counts: Mapping[str, int]) -> dict:
    """The X and O clips of a ``train_on_xo`` run: added (by consensus) and left out for
    lacking a target-class label."""
    return {"added_X": int(counts.get("added_X", 0)), "added_O": int(counts.get("added_O", 0)),
            "left_out_no_target_label": int(counts.get("xo_no_target_label", 0))}


def load_head(run_dir, *, map_location="cpu") -> Tuple[EmotionHead, dict]:
    """The best head of a run directory (in eval mode) and its checkpoint dict."""
    path = RunDir(run_dir).checkpoint_path
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {CHECKPOINT} (not a train-head run directory, or it did not finish)")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = EmotionHead(HeadConfig(**ckpt["head_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def load_config(run_dir) -> TrainConfig:
    return TrainConfig.from_dict(RunDir(run_dir).config())
