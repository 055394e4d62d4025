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

**Attributes** (``task``): ``"attributes"`` trains on every Train clip with arousal,
valence and dominance values (X and O included) with the CCC loss and keeps the epoch of
the best mean CCC over the Development clips with values; ``"joint"`` trains the
categories' clips on the categories loss plus ``attribute_weight`` × the CCC loss (over
the clips of the batch with values) and keeps the best macro-F1 epoch (its history also
has the Development CCC, over the scoreable clips). metrics.json then scores the
attributes of every clip with values on every split (``attributes``, ``ccc_mean``), and
the predictions CSV has the attribute columns (:mod:`conilium.runs`).

``metrics.json`` is written last: a run directory is complete when it exists. While a
run is being trained, ``out_dir`` holds a lock (:mod:`conilium.locking`): a second
train-head on the same directory stops with a message naming the first (or waits,
``wait_for_lock``). The output directory is checked for being writable (and for room for
the checkpoint) before training; a failure to write the outputs removes what was written
of them and is an :class:`~conilium.errors.OutputError` naming the file.

**One data pass, several heads.** :func:`train_heads` trains runs that read the same
batches (same cache, input selection, training clips and clip order, batch size and
runtime options: :func:`pass_key`) in one pass: each batch is read and collated once and
fed to every head, each with its own targets, loss, class weights, optimizer, random
stream, best-epoch bookkeeping and early stopping; the Development scoring and the final
predictions read each batch once for all heads. :func:`train_head` is a pass of one head,
and every head of a pass writes exactly what its own ``train_head`` writes (the same
predictions and metrics, timings aside): a head's weights are initialised from its seed
as alone, its dropout draws from its own copy of the random stream, and the clip order
has its own generator. train-grid (:mod:`conilium.heads.grid`) groups its runs with
:func:`plan_passes`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm import tqdm

import conilium
from conilium import CLASSES
from conilium.cache.reader import FeatureCache
from conilium.errors import ConfigError, ConiliumError
from conilium.locking import lock_directory
from conilium.runtime import resolve_device
from conilium.metrics import score, score_attributes
from conilium.runs import CONFIG, METRICS, PRED_DIR, is_complete, letters, write_run_outputs
from conilium.targets import (ATTRIBUTE_COLUMNS, ATTRIBUTES, TARGET_KINDS, attribute_set, attribute_values, base_kind,
                              class_counts, class_weights, to_unit, training_set)
from conilium.util import (atomic_path, check_writable, output_errors, read_json, seed_everything,
                           write_json)

from .batches import Batch, BatchReader, loader_batches
from .config import TrainConfig, check_task
from .data import (GIB, ClipDataset, InputSelection, check_cache_dir, check_clips, collate, feature_bytes,
                   length_batches, parse_layers, select_input)
from .losses import activation, ccc_loss, check_loss, loss_fn, uses_weights
from .model import POOLINGS, EmotionHead, HeadConfig
from .predict import predict_many, stack_scores
from .samplers import balanced_sampler, check_sampler

CHECKPOINT = "model.pt"
CHECKPOINT_FORMAT = 1


class TrainingError(ConiliumError):
    """Training cannot go on (the loss became NaN or infinite)."""


#: Fields that change speed only: two configs differing only in these give the same run.
RUNTIME_FIELDS = ("num_workers", "device", "preload", "preload_budget_gb", "threads")


def same_run(a: Mapping, b: Mapping) -> bool:
    """True when two config mappings describe the same run (runtime fields aside).

    A field missing from one of them (a config.json written before the field existed)
    reads as its default, as :meth:`TrainConfig.from_dict` reads it.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    ka = {k: v for k, v in {**defaults, **a}.items() if k not in RUNTIME_FIELDS}
    kb = {k: v for k, v in {**defaults, **b}.items() if k not in RUNTIME_FIELDS}
    return ka == kb


def check_config(config: TrainConfig) -> None:
    """Errors for option values that are wrong whatever the cache."""
    if config.labels not in TARGET_KINDS:
        raise ConfigError(f"unknown --labels {config.labels!r}; expected one of {', '.join(TARGET_KINDS)}")
    check_loss(config.loss, config.labels)
    check_sampler(config.sampler)
    check_task(config.task, config.attribute_weight)
    if config.task == "attributes" and config.sampler is not None:
        raise ConfigError(f"--sampler {config.sampler} draws clips by consensus class; --task attributes trains on "
                          f"every clip with attribute values (X and O included): use no sampler")
    if config.train_on_xo:
        if config.task == "attributes":
            raise ConfigError("--train-on-xo adds X and O clips to the category targets; --task attributes already "
                              "trains on every clip with attribute values, X and O included")
        if base_kind(config.labels) == "hard":
            raise ConfigError(f"--train-on-xo needs soft targets (--labels P, S, P* or S*, and a loss other than "
                              f"wce): X and O clips have no one-hot consensus target, not --labels {config.labels}"
                              + (f" with --loss {config.loss}" if config.loss == "wce" else ""))
        if config.sampler is not None:
            raise ConfigError(f"--train-on-xo with --sampler {config.sampler}: the sampler draws by consensus class, "
                              f"and X and O clips have none")
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
    #: (N, 3) attribute values of the training clips on the corpus scale, NaN where unknown
    #: (None for ``task="categories"``)
    train_attributes: Optional[np.ndarray] = None


def prepare(config: TrainConfig, *, cache: Optional[FeatureCache] = None) -> PreparedData:
    """Open the cache and check every choice against it (clear errors before any training).

    ``cache``: the already open :class:`FeatureCache` of ``config.cache`` (the heads of one
    data pass share it).
    """
    check_config(config)
    if cache is None:
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
    if config.task == "attributes":
        clips, _, counts = attribute_set(train_clips)
        if not clips:
            raise ConfigError(f"--task attributes: no clip of split {config.train_split} in cache {cache.path} has "
                              f"arousal, valence and dominance values (EmoAct, EmoVal, EmoDom in "
                              f"labels_consensus.csv, or the annotators' A/V/D)")
        targets = np.zeros((len(clips), 0), dtype=np.float32)
    else:
        clips, targets, counts = training_set(train_clips, config.labels, thresholds=config.thresholds,
                                              include_xo=config.train_on_xo)
        if not clips:
            raise ConfigError(f"no training clip left for --labels {config.labels} in split {config.train_split} "
                              f"(dropped: {counts})")
    # noise-augmented copies (extract-features --augment-noise) train, but are never scored
    if config.task == "attributes":
        dev_names = [n for n in cache.split(config.dev_split, augmented=False)
                     if not np.isnan(attribute_values(cache.clips[n])).any()]
        what = "clip with attribute values"
    else:
        dev_names = [n for n in cache.split(config.dev_split, augmented=False) if cache.clips[n].scoreable]
        what = "scoreable clip"
    if not dev_names:
        raise ConfigError(f"cache {cache.path} has no {what} in split {config.dev_split!r} to select "
                          f"the best epoch (splits: {', '.join(cache.splits)})")
    train_names = [c.name for c in clips]
    check_clips(cache, train_names + dev_names, selection)
    labels = [c.emo_class for c in clips]
    weights = (class_weights(labels) if (config.task != "attributes" and uses_weights(config.loss)
                                         and config.sampler is None) else None)
    attributes = None
    if config.task != "categories":
        attributes = np.stack([attribute_values(c) for c in clips]) if clips else np.zeros((0, len(ATTRIBUTES)))
        if config.task == "joint" and np.isnan(attributes).any(axis=1).all():
            raise ConfigError(f"--task joint: no training clip of split {config.train_split} in cache {cache.path} "
                              f"has arousal, valence and dominance values")
    return PreparedData(cache, selection, train_names, targets, labels, dev_names, counts, weights, attributes)


def head_config_for(config: TrainConfig, selection: InputSelection) -> HeadConfig:
    extra = {}
    if config.task != "categories":  # a categories head's config stays as it always was
        extra = {"attributes": len(ATTRIBUTES), "num_classes": 0 if config.task == "attributes" else len(CLASSES)}
    return HeadConfig(dim=selection.dim, num_layers=selection.num_layers,
                      layers="weighted" if selection.positions is None else 0,
                      pooling="stats" if selection.kind == "pooled" else config.pooling,
                      hidden=config.hidden, dropout=config.dropout, **extra)


def _batches(dataset: ClipDataset, index_batches: Sequence[Sequence[int]], device: torch.device, *,
             num_workers: int = 0, persistent: bool = False) -> Callable[[], Iterator[Batch]]:
    """The batches ``index_batches`` of ``dataset``: padded into reused buffers in this process
    (:class:`~conilium.heads.batches.BatchReader`), or collated by DataLoader workers when
    streaming with ``num_workers``. Call again for another pass over the same batches."""
    if dataset.preloaded or num_workers == 0:
        reader = BatchReader(dataset, device, max_batch=max(len(b) for b in index_batches))
        return lambda: reader(index_batches)
    loader = DataLoader(dataset, batch_sampler=index_batches, collate_fn=collate, num_workers=num_workers,
                        persistent_workers=persistent, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(0))  # leaves the global random stream alone
    return lambda: loader_batches(loader, device)


def _predict(models: Sequence[Tuple[torch.nn.Module, str]], batches: Iterator[Batch], n: int, *, device,
             progress: bool = False, desc: str = "predicting", total: Optional[int] = None) -> List[np.ndarray]:
    """(n, C + A) scores of each model on ``batches`` (read once for all of them): class
    scores, then attribute values on the corpus scale for a head with attributes."""
    scores = predict_many(models, (((x, lengths), idx) for x, lengths, idx in batches), device=device,
                          progress=progress, desc=desc, total=total)
    return [stack_scores(s, n, getattr(m, "output_width", len(CLASSES))) for s, (m, _) in zip(scores, models)]


def predict_probs(model: EmotionHead, dataset: ClipDataset, loss: str, *, batch_size: int,
                  device: torch.device, num_workers: int = 0, progress: bool = False,
                  desc: str = "predicting") -> np.ndarray:
    """(N, C) class scores of every clip of ``dataset`` (sigmoid or softmax, as the loss sees them).

    Batches group clips of similar length; the scores do not depend on the batching
    since pooling ignores padded frames.
    """
    batches = length_batches(dataset.cache, dataset.names, batch_size, dataset.selection)
    read = _batches(dataset, batches, device, num_workers=num_workers)
    return _predict([(model, loss)], read(), len(dataset), device=device, progress=progress, desc=desc,
                    total=len(batches))[0]

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


def make_optimizer(params, config: TrainConfig) -> Tuple[torch.optim.Optimizer, str]:
    """AdamW over ``params``, and the implementation's name.

    The fused implementation (one kernel for every tensor, on CPU and CUDA where torch has
    it) instead of the per-tensor loop, which took 14–17 % of a CPU head epoch; its
    updates differ from the loop's in the last bits of float32 rounding (≈6e-8 after 30
    steps on a head's weights), so a run trained before it differs in the last digits.
    Without it: the foreach implementation, bitwise equal to the loop.
    """
    params = list(params)
    kw = dict(lr=config.lr, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw), "AdamW (fused)"
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **kw), "AdamW (foreach)"


def _freeze_constant_mix(model: EmotionHead) -> None:
    """Freeze the layer weight of a ``"weighted"`` mix of one layer (a one-layer cache).

    A softmax over one weight is 1 whatever the weight, so its gradient is exactly 0 and
    AdamW leaves the weight at 0: frozen, the run is bitwise the same, and the backward
    pass no longer computes the gradient of the pooling's input (a frames × dim × dim
    matmul and the pooling's elementwise gradients, about a third of a step).
    """
    mix = model.layer_mix.weights
    if mix is not None and mix.numel() == 1:
        mix.requires_grad_(False)


class _RandomStream:
    """A head's own copy of the global random stream (CPU, and the device's on CUDA), swapped in
    around its training step: dropout then draws what it would draw in the head's run alone."""

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


class _Head:
    """One head of a data pass: model, optimizer, random stream, targets, and its best epoch."""

    def __init__(self, config: TrainConfig, out_dir: Path, data: PreparedData, device: torch.device):
        self.config, self.out_dir, self.data = config, Path(out_dir), data
        self.head_cfg = head_config_for(config, data.selection)
        torch.manual_seed(config.seed)
        self.model = EmotionHead(self.head_cfg).to(device)
        self.rng = _RandomStream(device)  # right after the init, as a run alone goes on
        _freeze_constant_mix(self.model)
        self.optimizer, self.optimizer_name = make_optimizer(
            (p for p in self.model.parameters() if p.requires_grad), config)
        self.fn = loss_fn(config.loss)
        self.weights = None if data.weights is None else torch.as_tensor(data.weights, device=device)
        self.targets = torch.as_tensor(np.asarray(data.train_targets, dtype=np.float32)).to(device)
        self.task = config.task
        self.num_classes = self.head_cfg.num_classes
        if data.train_attributes is not None:
            known = ~np.isnan(data.train_attributes).any(axis=1)
            unit = np.where(known[:, None], to_unit(np.nan_to_num(data.train_attributes)), 0.0)
            self.attr_targets = torch.as_tensor(unit, dtype=torch.float32).to(device)
            self.attr_mask = torch.as_tensor(known, dtype=torch.float32).to(device)
        # the best epoch: by Development mean CCC for attributes only, by macro-F1 otherwise
        self.select_by = "dev_ccc_mean" if self.task == "attributes" else "dev_f1_macro"
        self.history: List[dict] = []
        self.best_value, self.best_epoch, self.best_state, self.since_best = -math.inf, 0, None, 0
        self.stopped = False
        self.error: Optional[BaseException] = None
        self.total, self.seen = 0.0, 0
        self.split_predictions: Dict[str, tuple] = {}

    def trains(self, epoch: int) -> bool:
        return self.error is None and not self.stopped and epoch <= self.config.epochs

    def step(self, x: torch.Tensor, lengths: Optional[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        """One AdamW step on the batch; the loss (not yet read back from the device)."""
        with self.rng:
            logits = self.model(x, lengths)
            if self.task == "categories":
                loss = self.fn(logits, self.targets[idx], self.weights)
            else:
                c = self.num_classes
                loss = ccc_loss(logits[:, c:], self.attr_targets[idx], None if self.task == "attributes"
                                else self.attr_mask[idx])
                if self.task == "joint":
                    loss = self.fn(logits[:, :c], self.targets[idx], self.weights) + self.config.attribute_weight * loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def count(self, value: float, n: int, *, epoch: int, step: int) -> None:
        if not math.isfinite(value):
            self.error = TrainingError(
                f"training stopped: the {self.config.loss} loss is {value} at epoch {epoch}, step {step} "
                f"(lr {self.config.lr}); lower --lr, or check the cache's features with verify-cache")
            return
        self.total += value * n
        self.seen += n

    def dev_scores(self, scores: np.ndarray, refs: Sequence[Optional[str]], attr_refs: np.ndarray) -> dict:
        """This epoch's Development entries of the history, from the head's (n, C + A) scores."""
        out = {}
        c = self.num_classes
        if c:
            dev = score(refs, letters(scores[:, :c]))
            out.update(dev_f1_macro=dev["f1_macro"], dev_f1_micro=dev["f1_micro"])
        if self.task != "categories":
            a = score_attributes(attr_refs, scores[:, c:], ATTRIBUTE_COLUMNS)
            out["dev_ccc_mean"] = a["ccc_mean"]
            out.update({f"dev_ccc_{name}": a[name]["ccc"] for name in ATTRIBUTE_COLUMNS})
        return out

    def end_epoch(self, epoch: int, dev: dict, train_seconds: float, seconds: float) -> None:
        self.history.append({"epoch": epoch, "train_loss": self.total / max(self.seen, 1), **dev,
                             "train_seconds": round(train_seconds, 3), "seconds": round(seconds, 3)})
        value = dev[self.select_by]
        if value > self.best_value:
            self.best_value, self.best_epoch, self.since_best = value, epoch, 0
            self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        else:
            self.since_best += 1
        if self.config.patience is not None and self.since_best >= self.config.patience:
            self.stopped = True
        self.total, self.seen = 0.0, 0


def pass_key(config: TrainConfig, data: PreparedData) -> tuple:
    """What the heads of one data pass share: the cache, the input read from it, the training
    clips in their order (sampler, seed, batch size), the Development split and the runtime
    options (device, preloading, loader workers, threads). Runs with equal keys read the same
    batches; the loss, targets, pooling, sizes, learning rate, epochs and patience may differ.
    The task may differ too when the clips are the same: an attributes run trains on every
    clip with attribute values (X and O included) and is scored on the Development clips with
    attribute values, so it shares a pass only with runs reading those very clips."""
    return (str(Path(config.cache).resolve()), data.selection, tuple(data.train_names), tuple(data.dev_names),
            config.sampler,
            config.seed, config.batch_size, config.train_split, config.dev_split, config.device, config.preload,
            config.preload_budget_gb, config.num_workers, config.threads)


def plan_passes(configs: Sequence[TrainConfig]) -> List[List[int]]:
    """Indices of ``configs`` grouped into data passes (:func:`pass_key`), in order of first appearance.

    A config that cannot be prepared (a missing cache, no annotations for its targets, …)
    is a pass of its own, where it fails with the error :func:`train_head` gives it.
    """
    caches: Dict[str, FeatureCache] = {}
    groups: Dict[object, List[int]] = {}
    for i, config in enumerate(configs):
        try:
            where = str(Path(config.cache).resolve())
            if where not in caches:
                check_cache_dir(config.cache)
                caches[where] = FeatureCache(config.cache)
            key = pass_key(config, prepare(config, cache=caches[where]))
        except Exception:  # noqa: BLE001 - it fails again, with its message, when trained
            key = ("alone", i)
        groups.setdefault(key, []).append(i)
    for cache in caches.values():
        cache.close()
    return list(groups.values())


@contextlib.contextmanager
def _claim(config: TrainConfig, out_dir: Path, *, overwrite: bool, progress: bool, wait_for_lock,
           cache: Optional[FeatureCache] = None) -> Iterator[PreparedData]:
    """The checks before training a run into ``out_dir``, its lock held meanwhile; the prepared data."""
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
        data = prepare(config, cache=cache)
        # room for the checkpoint and the predictions, before any feature is read
        predicted = sum(len(data.cache.split(s, augmented=False)) for s in data.cache.splits)
        need = output_bytes(EmotionHead(head_config_for(config, data.selection)), predicted)
        check_writable(out_dir, what="train-head run directory", need_bytes=need)
        yield data


@contextlib.contextmanager
def _threads(n: Optional[int]):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)  # a library call leaves the process as it found it


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
    with _claim(config, out_dir, overwrite=overwrite, progress=progress, wait_for_lock=wait_for_lock) as data:
        with _threads(config.threads):
            return _train(config, out_dir, data, progress=progress)


def _train(config: TrainConfig, out_dir: Path, data: PreparedData, *, progress: bool) -> dict:
    result = _train_pass([(config, out_dir, data)], progress=progress)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def train_heads(runs: Sequence[Tuple[TrainConfig, Union[str, Path]]], *, overwrite: bool = False,
                progress: bool = True, wait_for_lock=False) -> List[Union[dict, BaseException]]:
    """Train ``runs`` (``(config, out_dir)`` pairs that share one data pass, see :func:`pass_key`)
    in one pass; for each run, its metrics or the error that stopped it.

    Each run is checked, locked and written as :func:`train_head` does it, and gets the
    same files; a run that fails (its checks, a non-finite loss, writing its outputs) gives
    its error and the others go on. An error of the shared part (reading the cache) is
    every run's. Runs that do not share a pass are a :class:`~conilium.errors.ConfigError`
    before anything is trained (group them with :func:`plan_passes`).
    """
    results: List[Union[dict, BaseException, None]] = [None] * len(runs)
    if not runs:
        return []
    first = runs[0][0]
    with contextlib.ExitStack() as stack:
        try:
            check_cache_dir(first.cache)
            cache = stack.enter_context(FeatureCache(first.cache))
        except ConiliumError as e:
            return [e] * len(runs)
        members, keys = [], set()
        for i, (config, out_dir) in enumerate(runs):
            try:
                if Path(config.cache).resolve() != Path(first.cache).resolve():
                    raise ConfigError(f"train_heads: run {out_dir} reads cache {config.cache}, not {first.cache}")
                data = stack.enter_context(_claim(config, Path(out_dir), overwrite=overwrite, progress=progress,
                                                  wait_for_lock=wait_for_lock, cache=cache))
            except ConiliumError as e:
                results[i] = e
                continue
            members.append((i, (config, Path(out_dir), data)))
            keys.add(pass_key(config, data))
        if len(keys) > 1:
            raise ConfigError("train_heads: the runs do not share one data pass (cache, input, training clips, "
                              "sampler, seed, batch size and runtime options must be equal); group them with "
                              "plan_passes")
        if members:
            with _threads(first.threads):
                try:
                    got = _train_pass([m for _, m in members], progress=progress)
                except ConiliumError as e:
                    got = [e] * len(members)
            for (i, _), r in zip(members, got):
                results[i] = r
    return results


def _train_pass(members: Sequence[Tuple[TrainConfig, Path, PreparedData]], *,
                progress: bool) -> List[Union[dict, BaseException]]:
    """Train the heads of one data pass; each head's metrics, or the error that stopped it."""
    config, _, data = members[0]
    device = resolve_device(config.device)
    seed_everything(config.seed)
    t_start = time.time()

    cache, sel = data.cache, data.selection
    nbytes = feature_bytes(cache, data.train_names, sel) + feature_bytes(cache, data.dev_names, sel)
    preload = _use_preload(config, nbytes)
    train_ds = ClipDataset(cache, data.train_names, sel, None, preload=preload, progress=progress,
                           desc="loading Train features")
    dev_ds = ClipDataset(cache, data.dev_names, sel, None, preload=preload, progress=progress,
                         desc=f"loading {config.dev_split} features")
    dev_refs = [cache.clips[n].emo_class for n in data.dev_names]
    dev_attr_refs = np.stack([attribute_values(cache.clips[n]) for n in data.dev_names])
    heads = [_Head(c, out_dir, d, device) for c, out_dir, d in members]

    # The clip order has its own generator, and so has the DataLoader (it draws worker seeds
    # from it): neither touches the random streams of the heads' dropout. With or without
    # worker processes, the same seed gives the same order, shared by every head.
    order_gen = torch.Generator().manual_seed(config.seed)
    loader_gen = torch.Generator().manual_seed(config.seed + 1)
    if config.sampler == "balanced":
        sampler = balanced_sampler(data.train_labels, generator=order_gen)
    else:
        sampler = RandomSampler(train_ds, generator=order_gen)
    workers = 0 if preload else config.num_workers
    order = BatchSampler(sampler, config.batch_size, drop_last=False)
    if workers == 0:
        reader = BatchReader(train_ds, device, max_batch=config.batch_size)
        train_batches = lambda: reader(order)  # noqa: E731
    else:
        loader = DataLoader(train_ds, batch_sampler=order, collate_fn=collate, num_workers=workers,
                            persistent_workers=True, generator=loader_gen, pin_memory=device.type == "cuda")
        train_batches = lambda: loader_batches(loader, device)  # noqa: E731
    dev_order = length_batches(cache, data.dev_names, config.batch_size, sel)
    dev_batches = _batches(dev_ds, dev_order, device, num_workers=config.num_workers, persistent=True)

    names = ", ".join(h.out_dir.name for h in heads)
    bar = tqdm(range(1, max(h.config.epochs for h in heads) + 1), desc="epochs" if len(heads) == 1 else
               f"epochs ({len(heads)} heads: {names})", unit="epoch", disable=not progress)
    for epoch in bar:
        active = [h for h in heads if h.trains(epoch)]
        if not active:
            break
        t0 = time.time()
        for h in active:
            h.model.train()
        steps = tqdm(train_batches(), total=len(order), desc=f"epoch {epoch}", unit="batch", leave=False,
                     disable=not progress)
        for step, (x, lengths, idx) in enumerate(steps, start=1):
            at = torch.as_tensor(idx, dtype=torch.long).to(device, non_blocking=True)
            losses = [h.step(x, lengths, at) for h in active]
            # one read back from the device per batch for every head (the finite check and the running loss)
            for h, value in zip(active, torch.stack(losses).tolist()):
                h.count(value, len(idx), epoch=epoch, step=step)
            active = [h for h in active if h.error is None]
            if not active:
                break
            if len(active) == 1:
                steps.set_postfix(loss=f"{active[0].total / max(active[0].seen, 1):.4f}")
        steps.close()
        train_seconds = time.time() - t0
        scored = [h for h in heads if h.trains(epoch)]
        if scored:
            probs = _predict([(h.model, h.config.loss) for h in scored], dev_batches(), len(dev_ds), device=device)
            for h, p in zip(scored, probs):
                h.end_epoch(epoch, h.dev_scores(p, dev_refs, dev_attr_refs), train_seconds, time.time() - t0)
        if len(heads) == 1 and heads[0].history and heads[0].history[-1]["epoch"] == epoch:
            h = heads[0]
            name = "dev_ccc" if h.select_by == "dev_ccc_mean" else "dev_f1"
            bar.set_postfix({"loss": f"{h.history[-1]['train_loss']:.4f}",
                             name: f"{h.history[-1][h.select_by]:.3f}", "best": f"{h.best_value:.3f}@{h.best_epoch}"})
    bar.close()
    done = [h for h in heads if h.error is None]
    for h in done:
        h.model.load_state_dict(h.best_state)
    train_seconds = time.time() - t_start

    # predictions of each head's best epoch on every split of the cache, Development first,
    # every batch read once for all heads
    splits = [config.dev_split] + [s for s in cache.splits if s != config.dev_split]
    for split in splits if done else []:
        split_names = cache.split(split, augmented=False)
        if not split_names:
            continue
        check_clips(cache, split_names, sel)
        ds = ClipDataset(cache, split_names, sel, None)
        batches = length_batches(cache, split_names, config.batch_size, sel)
        read = _batches(ds, batches, device, num_workers=config.num_workers)
        probs = _predict([(h.model, h.config.loss) for h in done], read(), len(ds), device=device,
                         progress=progress, desc=f"predicting {split}", total=len(batches))
        refs = [cache.clips[n].emo_class for n in split_names]
        attr_refs = np.stack([attribute_values(cache.clips[n]) for n in split_names])
        for h, p in zip(done, probs):
            c = h.num_classes
            h.split_predictions[split] = ((split_names, p, refs) if h.task == "categories" else
                                          (split_names, p[:, :c], refs, p[:, c:], attr_refs))

    results: List[Union[dict, BaseException]] = []
    for h in heads:
        if h.error is not None:
            results.append(h.error)
            continue
        try:
            try:
                with output_errors(h.out_dir):
                    h.out_dir.mkdir(parents=True, exist_ok=True)
                    _clear_outputs(h.out_dir)
                results.append(_write_outputs(h, train_seconds=train_seconds, preload=preload, nbytes=nbytes,
                                              device=device))
            except BaseException:
                _remove_partial_outputs(h.out_dir)
                raise
        except ConiliumError as e:
            results.append(e)
    return results


def _write_outputs(head: _Head, *, train_seconds: float, preload: bool, nbytes: int, device: torch.device) -> dict:
    """config.json, model.pt, predictions/ and, last, metrics.json."""
    config, out_dir, data = head.config, head.out_dir, head.data
    cache, sel = data.cache, data.selection
    history = head.history
    write_json(out_dir / CONFIG, config.to_json())
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
        "cache_manifest": manifest_summary(cache.manifest),
        "train_config": config.to_json(),
        "best_epoch": head.best_epoch,
    }
    if config.task != "categories":
        checkpoint.update(task=config.task, attributes=list(ATTRIBUTE_COLUMNS), attribute_scale="(v - 1) / 6")
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
