"""What a head run writes and how it is read back (see :mod:`conilium.runs`)::

    config.json               the TrainConfig
    model.pt                  the best checkpoint (:func:`load_head`)
    metrics.json              Development scores at top level, best_epoch, history, "splits"
    predictions/<Split>.csv   every split of the cache

``metrics.json`` is written last: a run directory is complete when it exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import conilium
from conilium import CLASSES
from conilium.errors import ConfigError
from conilium.dirs import Manifest, RunDir
from conilium.runs import write_run_outputs
from conilium.targets import ATTRIBUTE_COLUMNS, class_counts
from conilium.training.loop import stage_summary
from conilium.training.losses import activation
from conilium.util import atomic_path

from .config import TrainConfig
from .model import EmotionHead, HeadConfig, build_head

CHECKPOINT = RunDir.CHECKPOINT
CHECKPOINT_FORMAT = 1


@dataclass
class HeadCheckpoint:
    """A head run's ``model.pt``: the best epoch's weights and what a reader needs to use them —
    the head's shape, the loss and targets it was trained with, the input it read from the
    cache (``input``: kind, upstream layers, positions), the cache's manifest without its
    shard list (the upstream and signal path to reproduce it), the run's config.

    On disk it is one dict with these keys (``task``, ``attributes`` and ``attribute_scale``
    only for a head with attributes), as every version wrote it.
    """

    head_config: dict
    state_dict: Dict[str, torch.Tensor]
    loss: str
    labels: str
    classes: List[str]
    input: dict
    cache_manifest: Manifest
    train_config: dict = field(default_factory=dict)
    best_epoch: Optional[int] = None
    task: str = "categories"
    format: int = CHECKPOINT_FORMAT
    conilium_version: str = ""
    #: a fusion head's branches, one per cache, the primary's first: each its ``head_config``, the
    #: ``input`` read from its cache, its ``cache`` (absolute path) and ``cache_manifest`` (None: one cache)
    branches: Optional[List[dict]] = None
    #: how a fusion head combines its branches (``TrainConfig.fusion``; written with ``branches``)
    fusion: str = "concat"

    REQUIRED = ("head_config", "state_dict", "loss")

    @property
    def upstream_layers(self) -> List[int]:
        return [int(i) for i in self.input.get("upstream_layers") or []]

    @property
    def cache(self) -> Optional[str]:
        """The cache the head was trained on, as its config recorded it."""
        value = self.train_config.get("cache")
        return str(value) if value else None

    def to_dict(self) -> dict:
        d = {"format": self.format, "conilium_version": self.conilium_version, "head_config": self.head_config,
             "state_dict": self.state_dict, "loss": self.loss, "labels": self.labels,
             "activation": activation(self.loss), "classes": list(self.classes), "input": self.input,
             "cache_manifest": dict(self.cache_manifest), "train_config": self.train_config,
             "best_epoch": self.best_epoch}
        if self.task != "categories":
            d.update(task=self.task, attributes=list(ATTRIBUTE_COLUMNS), attribute_scale="(v - 1) / 6")
        if self.branches is not None:
            d.update(branches=self.branches, fusion=self.fusion)
        return d

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".pt.tmp") as tmp:
            torch.save(self.to_dict(), tmp)

    @classmethod
    def load(cls, path: Path) -> "HeadCheckpoint":
        """Read ``path``; a damaged or foreign file is a ConfigError naming it."""
        try:
            d = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise ConfigError(f"{path}: cannot read the head checkpoint ({type(e).__name__}: {e}); train the head "
                              f"again (train-head --overwrite)") from None
        missing = [k for k in cls.REQUIRED if not isinstance(d, dict) or k not in d]
        if missing:
            raise ConfigError(f"{path}: not a train-head checkpoint (no {', '.join(missing)})")
        return cls(head_config=d["head_config"], state_dict=d["state_dict"], loss=d["loss"],
                   labels=d.get("labels", ""), classes=list(d.get("classes") or CLASSES), input=d.get("input") or {},
                   cache_manifest=Manifest(d.get("cache_manifest") or {}), train_config=d.get("train_config") or {},
                   best_epoch=d.get("best_epoch"), task=d.get("task", "categories"),
                   format=d.get("format", CHECKPOINT_FORMAT), conilium_version=d.get("conilium_version", ""),
                   branches=d.get("branches"), fusion=d.get("fusion", "concat"))


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


def recorded_config(config: TrainConfig) -> dict:
    """What a run records of ``config`` (config.json, the checkpoint's ``train_config``): its cache
    as an absolute path, so that the run is read (predict --run, conilium-eval, --config, a rerun)
    from any working directory."""
    d = dict(config.to_json(), cache=os.path.abspath(config.cache))
    if config.more_caches:
        d["more_caches"] = [os.path.abspath(c) for c in config.more_caches]
    return d


def write_outputs(head, *, train_seconds: float, preload: bool, nbytes: int, device: torch.device) -> dict:
    """config.json, model.pt, predictions/ and, last, metrics.json."""
    config, out_dir, data = head.config, head.out_dir, head.data
    cache, sel = data.cache, data.selection
    history = head.history
    run = RunDir(out_dir)
    recorded = recorded_config(config)
    run.write_config(recorded)
    branches = None
    if data.more:
        branches = [{"head_config": asdict(c), "input": s.to_json(), "cache": os.path.abspath(b.path),
                     "cache_manifest": dict(b.manifest.summary())}
                    for c, (b, s) in zip(head.head_cfgs, data.branches)]
    HeadCheckpoint(head_config=asdict(head.head_cfg), state_dict=head.best_state, loss=config.loss,
                   labels=config.labels, classes=list(data.classes.codes), input=sel.to_json(),
                   cache_manifest=cache.manifest.summary(), train_config=recorded,
                   best_epoch=head.best_epoch, task=config.task,
                   conilium_version=conilium.__version__, branches=branches,
                   fusion=config.fusion).save(run.checkpoint_path)
    extra = {
        "training": {
            "clips": len(data.train_names),
            "class_counts": dict(zip(data.classes.codes, class_counts(data.train_labels, data.classes).tolist())),
            "dropped": data.counts,
            "class_weights": None if data.weights is None else dict(zip(data.classes.codes, data.weights.tolist())),
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
    if data.more:
        extra["training"]["fusion"] = {"combine": config.fusion,
                                       "caches": [{"cache": os.path.abspath(b.path), "input": s.to_json(),
                                                   "upstream": (b.manifest.upstream or {}).get("name")}
                                                  for b, s in data.branches]}
    if getattr(head, "stacking", None) is not None:
        extra["training"]["stacking"] = head.stacking
    if head.aux_scores is not None:
        extra["aux"] = head.aux_scores
    if config.balanced_stage:
        extra["training"]["balanced_stage"] = stage_summary(history, head.selection.metric, head.best_epoch,
                                                           config.balanced_stage)
    if config.mixup:
        extra["training"]["mixup"] = config.mixup
    if config.task != "categories":
        known = int((~np.isnan(data.train_attributes).any(axis=1)).sum())
        extra["training"].update(task=config.task, attribute_clips=known,
                                 attribute_weight=config.attribute_weight if config.task == "joint" else None)
    if config.train_on_xo:
        extra["training"]["xo"] = xo_summary(data.counts)
    if not data.classes.is_default:
        extra["classes"] = data.classes.to_json()
    return write_run_outputs(out_dir, head.split_predictions, history, head.best_epoch, dev_split=config.dev_split,
                             extra=extra, classes=data.classes.codes)


def xo_summary(counts: Mapping[str, int]) -> dict:
    """The X and O clips of a ``train_on_xo`` run: added (by consensus) and left out for
    lacking a target-class label."""
    return {"added_X": int(counts.get("added_X", 0)), "added_O": int(counts.get("added_O", 0)),
            "left_out_no_target_label": int(counts.get("xo_no_target_label", 0))}


def load_head(run_dir, *, fusion: bool = False) -> Tuple[EmotionHead, HeadCheckpoint]:
    """The best head of a run directory (in eval mode, on the CPU) and its checkpoint.

    A fusion run's head (a :class:`~conilium.heads.model.FusionHead`, one branch per cache) is
    read with ``fusion=True`` only (``predict --run``, which runs every cache's upstream, the
    text ones on each file's transcript): the other readers run a head on one upstream's
    features of new audio, and a ConfigError says why a fusion head is not such a head."""
    path = RunDir(run_dir).checkpoint_path
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {CHECKPOINT} (not a train-head run directory, or it did not finish)")
    ckpt = HeadCheckpoint.load(path)
    if ckpt.branches:
        if not fusion:
            caches = ", ".join(str(b.get("cache")) for b in ckpt.branches)
            raise ConfigError(f"{run_dir}: a fusion head, trained on the features of {len(ckpt.branches)} caches "
                              f"({caches}); it needs each clip's features from every one of them (a text cache "
                              f"needs the clip's transcript), so it cannot run on one upstream over audio: "
                              f"export and --init-head take single-cache runs (predict --run reads a fusion run "
                              f"with each file's transcript)")
        model = build_head([HeadConfig(**b["head_config"]) for b in ckpt.branches], ckpt.fusion)
        model.load_state_dict(ckpt.state_dict)
        model.eval()
        return model, ckpt
    model = EmotionHead(HeadConfig(**ckpt.head_config))
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    return model, ckpt


def load_config(run_dir) -> TrainConfig:
    return TrainConfig.from_dict(RunDir(run_dir).config())
