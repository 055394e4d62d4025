"""train-head: a pooling head trained on a feature cache, every loss, target and sampler.

>>> from conilium.heads.train import TrainConfig, train_head
>>> metrics = train_head(TrainConfig(cache="cache/wavlm-large", loss="wbce", labels="S"), "runs/wbce-S")
>>> metrics["f1_macro"], metrics["best_epoch"]

One run: targets of the Train clips (``labels``: hard, P, S, P*, S*; P*/S* keep only the
high-agreement clips; noise-augmented copies in the cache train too, with their source
clip's labels, but are never scored nor predicted), AdamW, one pass over the training clips per epoch (shuffled, or
drawn by the class-balanced sampler), the development macro-F1 over *every* scoreable
Development clip after each epoch, the best epoch's weights kept, optional early
stopping. The run directory then gets (see :mod:`conilium.runs`)::

    config.json               the TrainConfig
    model.pt                  the best checkpoint (see :func:`load_head`)
    metrics.json              Development scores at top level, best_epoch, history, "splits"
    predictions/<Split>.csv   every split of the cache

``metrics.json`` is written last: a run directory is complete when it exists. While a
run is being trained, ``out_dir`` holds a lock (:mod:`conilium.locking`): a second
train-head on the same directory stops with a message naming the first (or waits,
``wait_for_lock``). The output directory is checked for being writable (and for room for
the checkpoint) before training; a failure to write the outputs removes what was written
of them and is an :class:`~conilium.errors.OutputError` naming the file.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

import conilium
from conilium import CLASSES
from conilium.cache.store import FeatureCache
from conilium.errors import ConfigError, ConiliumError
from conilium.locking import lock_directory
from conilium.runtime import resolve_device
from conilium.metrics import score
from conilium.runs import CONFIG, METRICS, PRED_DIR, is_complete, letters, write_run_outputs
from conilium.targets import TARGET_KINDS, base_kind, class_counts, class_weights, training_set
from conilium.util import (atomic_path, check_writable, output_errors, read_json, seed_everything,
                           write_json)

from .config import TrainConfig
from .data import (GIB, ClipDataset, InputSelection, check_cache_dir, check_clips, collate, feature_bytes,
                   length_batches, parse_layers, select_input)
from .losses import activation, check_loss, loss_fn, probabilities, uses_weights
from .model import POOLINGS, EmotionHead, HeadConfig
from .predict import predict_batches, stack_scores
from .samplers import balanced_sampler, check_sampler

CHECKPOINT = "model.pt"
CHECKPOINT_FORMAT = 1


class TrainingError(ConiliumError):
    """Training cannot go on (the loss became NaN or infinite)."""


#: Fields that change speed only: two configs differing only in these give the same run.
RUNTIME_FIELDS = ("num_workers", "device", "preload", "preload_budget_gb", "threads")


def same_run(a: Mapping, b: Mapping) -> bool:
    """True when two config mappings describe the same run (runtime fields aside)."""
    ka = {k: v for k, v in a.items() if k not in RUNTIME_FIELDS}
    kb = {k: v for k, v in b.items() if k not in RUNTIME_FIELDS}
    return ka == kb


def check_config(config: TrainConfig) -> None:
    """Errors for option values that are wrong whatever the cache."""
    if config.labels not in TARGET_KINDS:
        raise ConfigError(f"unknown --labels {config.labels!r}; expected one of {', '.join(TARGET_KINDS)}")
    check_loss(config.loss, config.labels)
    check_sampler(config.sampler)
    if not config.pooled_stats and config.pooling not in POOLINGS:
        raise ConfigError(f"unknown --pooling {config.pooling!r}; expected one of {', '.join(POOLINGS)}")
    parse_layers(config.layers)
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"--lr must be a positive number, not {config.lr}")
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, not {config.weight_decay}")
    for name in ("batch_size", "epochs", "hidden"):
        if int(getattr(config, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    if config.patience is not None and config.patience < 1:
        raise ConfigError(f"--patience must be at least 1 (or unset), not {config.patience}")
    if not 0 <= config.dropout < 1:
        raise ConfigError(f"--dropout must be in [0, 1), not {config.dropout}")
    for name in ("p_threshold", "s_threshold"):
        if not 0 < getattr(config, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1], not {getattr(config, name)}")
    if config.preload not in ("auto", "yes", "no"):
        raise ConfigError(f"--preload must be auto, yes or no, not {config.preload!r}")
    if config.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, not {config.num_workers}")
    resolve_device(config.device)


@dataclass
class PreparedData:
    """The clips and targets of a run, resolved against its cache."""

    cache: FeatureCache
    selection: InputSelection
    train_names: List[str]
    train_targets: np.ndarray
    train_labels: List[str]
    dev_names: List[str]
    counts: Dict[str, int]
    weights: Optional[np.ndarray]


def prepare(config: TrainConfig) -> PreparedData:
    """Open the cache and check every choice against it (clear errors before any training)."""
    check_config(config)
    check_cache_dir(config.cache)  # a run, model or corpus directory: say what it is, not "incomplete cache"
    cache = FeatureCache(config.cache)
    selection = select_input(cache, config.layers, config.pooled_stats)
    if base_kind(config.labels) != "hard" and not cache.has_annotations:
        raise ConfigError(f"--labels {config.labels} needs the annotators' labels, but cache {cache.path} holds "
                          f"no annotations (the corpus had no labels_detailed.csv); use --labels hard")
    train_clips = [cache.clips[n] for n in cache.split(config.train_split)]
    if not train_clips:
        raise ConfigError(f"cache {cache.path} has no clip in split {config.train_split!r} "
                          f"(splits: {', '.join(cache.splits)})")
    clips, targets, counts = training_set(train_clips, config.labels, thresholds=config.thresholds)
    if not clips:
        raise ConfigError(f"no training clip left for --labels {config.labels} in split {config.train_split} "
                          f"(dropped: {counts})")
    # noise-augmented copies (extract-features --augment-noise) train, but are never scored
    dev_names = [n for n in cache.split(config.dev_split, augmented=False) if cache.clips[n].scoreable]
    if not dev_names:
        raise ConfigError(f"cache {cache.path} has no scoreable clip in split {config.dev_split!r} to select "
                          f"the best epoch (splits: {', '.join(cache.splits)})")
    train_names = [c.name for c in clips]
    check_clips(cache, train_names + dev_names, selection)
    labels = [c.emo_class for c in clips]
    weights = class_weights(labels) if (uses_weights(config.loss) and config.sampler is None) else None
    return PreparedData(cache, selection, train_names, targets, labels, dev_names, counts, weights)


def head_config_for(config: TrainConfig, selection: InputSelection) -> HeadConfig:
    return HeadConfig(dim=selection.dim, num_layers=selection.num_layers,
                      layers="weighted" if selection.positions is None else 0,
                      pooling="stats" if selection.kind == "pooled" else config.pooling,
                      hidden=config.hidden, dropout=config.dropout)


def predict_probs(model: EmotionHead, dataset: ClipDataset, loss: str, *, batch_size: int,
                  device: torch.device, num_workers: int = 0, progress: bool = False,
                  desc: str = "predicting") -> np.ndarray:
    """(N, C) class scores of every clip of ``dataset`` (sigmoid or softmax, as the loss sees them).

    Batches group clips of similar length; the scores do not depend on the batching
    since pooling ignores padded frames.
    """
    batches = length_batches(dataset.cache, dataset.names, batch_size, dataset.selection)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=0 if dataset.preloaded else num_workers)
    inputs = (((x.float(), lengths), idx.tolist()) for x, lengths, _, idx in loader)
    scores = predict_batches(model, inputs, loss, device=device, progress=progress, desc=desc, total=len(batches))
    return stack_scores(scores, len(dataset), len(CLASSES))


def _clear_outputs(out_dir: Path) -> None:
    (out_dir / METRICS).unlink(missing_ok=True)  # first: the directory stops being complete
    (out_dir / CHECKPOINT).unlink(missing_ok=True)
    shutil.rmtree(out_dir / PRED_DIR, ignore_errors=True)


def _remove_partial_outputs(out_dir: Path) -> None:
    """After a failure to write the outputs: nothing of them is left (best effort, the disk
    may be read-only), so that no half-written run passes for one."""
    with contextlib.suppress(OSError):
        _clear_outputs(out_dir)
    with contextlib.suppress(OSError):
        (out_dir / CONFIG).unlink(missing_ok=True)


def check_out_dir(config: TrainConfig, out_dir) -> None:
    """Refuse an output directory that is the cache directory or lies inside it."""
    cache = Path(config.cache).resolve()
    out = Path(out_dir).resolve()
    if out == cache or cache in out.parents:
        where = "is the cache directory" if out == cache else f"lies inside the cache directory {config.cache}"
        raise ConfigError(f"--out {out_dir} {where}; the run's files would be mixed with the cache's. "
                          f"Choose an output directory outside the cache (e.g. runs/<name>)")


def output_bytes(model: torch.nn.Module, clips: int) -> int:
    """About how many bytes a run directory takes: the checkpoint (the best weights, float32)
    written beside the previous one, predictions CSV lines and the JSON files."""
    params = sum(p.numel() for p in model.parameters())
    return 2 * 4 * params + 150 * clips + (1 << 20)


def _use_preload(config: TrainConfig, nbytes: int) -> bool:
    if config.preload == "yes":
        return True
    if config.preload == "no":
        return False
    return nbytes <= config.preload_budget_gb * GIB


def train_head(config: TrainConfig, out_dir, *, overwrite: bool = False, progress: bool = True,
               wait_for_lock=False) -> dict:
    """Train one head on ``config.cache`` and write the run directory ``out_dir``; return its metrics.

    Raises :class:`~conilium.errors.ConfigError` for incompatible choices (an ``out_dir``
    inside the cache among them), :class:`~conilium.errors.CacheError` for a missing or
    incomplete cache (or another kind of directory passed as one),
    :class:`~conilium.errors.LockError` when another process is writing ``out_dir``
    (``wait_for_lock``: True or seconds to wait for it instead),
    :class:`~conilium.errors.OutputError` when ``out_dir`` cannot be written (checked
    before training) and :class:`TrainingError` when the loss stops being finite. Nothing
    but the lock is written to ``out_dir`` until training is over. An ``out_dir`` holding
    a complete run is refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    check_out_dir(config, out_dir)
    if is_complete(out_dir) and not overwrite:
        raise ConfigError(f"{out_dir} already holds a complete run; choose another output directory "
                          f"or overwrite it (--overwrite)")
    on_wait = (lambda m: tqdm.write(m, file=sys.stderr)) if progress else None
    with lock_directory(out_dir, what="train-head run directory", wait=wait_for_lock, on_wait=on_wait):
        if is_complete(out_dir) and not overwrite:  # finished while we waited for the lock
            raise ConfigError(f"{out_dir} already holds a complete run; choose another output directory "
                              f"or overwrite it (--overwrite)")
        check_writable(out_dir, what="train-head run directory")
        data = prepare(config)
        # room for the checkpoint and the predictions, before any feature is read
        predicted = sum(len(data.cache.split(s, augmented=False)) for s in data.cache.splits)
        need = output_bytes(EmotionHead(head_config_for(config, data.selection)), predicted)
        check_writable(out_dir, what="train-head run directory", need_bytes=need)
        threads_before = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(int(config.threads))
        try:
            return _train(config, out_dir, data, progress=progress)
        finally:
            torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _train(config: TrainConfig, out_dir: Path, data: PreparedData, *, progress: bool) -> dict:
    device = resolve_device(config.device)
    seed_everything(config.seed)
    t_start = time.time()

    cache, sel = data.cache, data.selection
    nbytes = feature_bytes(cache, data.train_names, sel) + feature_bytes(cache, data.dev_names, sel)
    preload = _use_preload(config, nbytes)
    train_ds = ClipDataset(cache, data.train_names, sel, data.train_targets, preload=preload,
                           progress=progress, desc="loading Train features")
    dev_ds = ClipDataset(cache, data.dev_names, sel, None, preload=preload, progress=progress,
                         desc=f"loading {config.dev_split} features")
    dev_refs = [cache.clips[n].emo_class for n in data.dev_names]

    head_cfg = head_config_for(config, sel)
    torch.manual_seed(config.seed)
    model = EmotionHead(head_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fn = loss_fn(config.loss)
    weights = None if data.weights is None else torch.as_tensor(data.weights, device=device)

    # The clip order has its own generator, and so has the DataLoader (it draws worker seeds
    # from it), so that neither touches the global RNG that dropout uses: with or without
    # worker processes, the same seed gives the same run.
    order_gen = torch.Generator().manual_seed(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    if config.sampler == "balanced":
        sampler = balanced_sampler(data.train_labels, generator=order_gen)
    else:
        sampler = RandomSampler(train_ds, generator=order_gen)
    workers = 0 if preload else config.num_workers
    loader = DataLoader(train_ds, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=workers, persistent_workers=workers > 0, generator=loader_gen,
                        pin_memory=device.type == "cuda")

    history: List[dict] = []
    best_f1, best_epoch, best_state, since_best = -1.0, 0, None, 0
    bar = tqdm(range(1, config.epochs + 1), desc="epochs", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.time()
        model.train()
        total, seen = 0.0, 0
        steps = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not progress)
        for step, (x, lengths, y, _) in enumerate(steps, start=1):
            x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
            logits = model(x, None if lengths is None else lengths.to(device))
            loss = fn(logits, y, weights)
            if not torch.isfinite(loss):
                bar.close()
                raise TrainingError(
                    f"training stopped: the {config.loss} loss is {loss.item()} at epoch {epoch}, step {step} "
                    f"(lr {config.lr}); lower --lr, or check the cache's features with verify-cache")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.item()) * len(y)
            seen += len(y)
            steps.set_postfix(loss=f"{total / seen:.4f}")
        train_seconds_epoch = time.time() - t0
        probs = predict_probs(model, dev_ds, config.loss, batch_size=config.batch_size, device=device,
                              num_workers=config.num_workers)
        dev = score(dev_refs, letters(probs))
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "dev_f1_macro": dev["f1_macro"],
                        "dev_f1_micro": dev["f1_micro"], "train_seconds": round(train_seconds_epoch, 3),
                        "seconds": round(time.time() - t0, 3)})
        if dev["f1_macro"] > best_f1:
            best_f1, best_epoch, since_best = dev["f1_macro"], epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
        bar.set_postfix(loss=f"{total / max(seen, 1):.4f}", dev_f1=f"{dev['f1_macro']:.3f}",
                        best=f"{best_f1:.3f}@{best_epoch}")
        if config.patience is not None and since_best >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    train_seconds = time.time() - t_start

    # predictions of the best epoch on every split of the cache, Development first
    split_predictions = {}
    order = [config.dev_split] + [s for s in cache.splits if s != config.dev_split]
    for split in order:
        names = cache.split(split, augmented=False)
        if not names:
            continue
        check_clips(cache, names, sel)
        ds = ClipDataset(cache, names, sel, None)
        probs = predict_probs(model, ds, config.loss, batch_size=config.batch_size, device=device,
                              num_workers=config.num_workers, progress=progress, desc=f"predicting {split}")
        split_predictions[split] = (names, probs, [cache.clips[n].emo_class for n in names])

    try:
        with output_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            _clear_outputs(out_dir)
        return _write_outputs(config, out_dir, data, head_cfg, best_state, best_epoch, history, split_predictions,
                              train_seconds=train_seconds, preload=preload, nbytes=nbytes, device=device)
    except BaseException:
        _remove_partial_outputs(out_dir)
        raise


def _write_outputs(config: TrainConfig, out_dir: Path, data: PreparedData, head_cfg: HeadConfig, best_state: dict,
                   best_epoch: int, history: List[dict], split_predictions: dict, *, train_seconds: float,
                   preload: bool, nbytes: int, device: torch.device) -> dict:
    """config.json, model.pt, predictions/ and, last, metrics.json."""
    cache, sel = data.cache, data.selection
    write_json(out_dir / CONFIG, config.to_json())
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "conilium_version": conilium.__version__,
        "head_config": asdict(head_cfg),
        "state_dict": best_state,
        "loss": config.loss,
        "labels": config.labels,
        "activation": activation(config.loss),
        "classes": list(CLASSES),
        "input": sel.to_json(),
        "cache_manifest": manifest_summary(cache.manifest),
        "train_config": config.to_json(),
        "best_epoch": best_epoch,
    }
    with atomic_path(out_dir / CHECKPOINT, suffix=".pt.tmp") as tmp:
        torch.save(checkpoint, tmp)
    extra = {
        "training": {
            "clips": len(data.train_names),
            "class_counts": dict(zip(CLASSES, class_counts(data.train_labels).tolist())),
            "dropped": data.counts,
            "class_weights": None if data.weights is None else dict(zip(CLASSES, data.weights.tolist())),
            "sampler": config.sampler,
            "epochs_run": len(history),
            "seconds": round(train_seconds, 3),
            # training steps only (reading, forward, backward, update), not the Development scoring
            "clips_per_second": round(len(data.train_names) * len(history)
                                      / max(sum(h["train_seconds"] for h in history), 1e-9), 2),
            "preloaded": preload,
            "feature_bytes": nbytes,
            "device": str(device),
            "input": sel.to_json(),
        },
    }
    return write_run_outputs(out_dir, split_predictions, history, best_epoch, dev_split=config.dev_split, extra=extra)


def manifest_summary(manifest: Mapping) -> dict:
    """The cache manifest without its shard list: upstream identity, layers, dim, normalisation, …"""
    return {k: v for k, v in manifest.items() if k != "shards"}


def load_head(run_dir, *, map_location="cpu") -> Tuple[EmotionHead, dict]:
    """The best head of a run directory (in eval mode) and its checkpoint dict."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {CHECKPOINT} (not a train-head run directory, or it did not finish)")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    model = EmotionHead(HeadConfig(**ckpt["head_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def load_config(run_dir) -> TrainConfig:
    return TrainConfig.from_dict(read_json(Path(run_dir) / CONFIG))
