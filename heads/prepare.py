"""A head run's data, checked before any training: :func:`prepare` resolves a
:class:`~conilium.heads.config.TrainConfig` against its cache (the training clips and
their targets, the Development clips, class weights, the input read from the cache), and
:func:`plan_passes` groups runs that read the same batches into one data pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from conilium.cache.reader import FeatureCache
from conilium.classes import MSP_PODCAST, ClassSet
from conilium.dirs import check_cache_dir
from conilium.errors import ConfigError
from conilium.runtime import resolve_device
from conilium.targets import (ATTRIBUTES, attribute_set, attribute_values, base_kind, class_weights, gender_targets,
                              training_set)
from conilium.training.losses import uses_weights

from .config import TrainConfig
from .data import GIB, ClipDataset, FusionDataset, InputSelection, check_clips, feature_bytes, select_input
from .model import HeadConfig


def check_config(config: TrainConfig) -> None:
    """Errors for option values that are wrong whatever the cache."""
    config.check()
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
    #: (N,) gender targets of the training clips (1 Female, 0 Male, NaN unknown; None without ``--aux gender``)
    train_gender: Optional[np.ndarray] = None
    #: the cache's class set: the columns of the targets and of every score
    classes: ClassSet = MSP_PODCAST
    #: a fusion run's further caches (``more_caches``, opened here) and the input read from each
    more: List[Tuple[FeatureCache, InputSelection]] = field(default_factory=list)

    @property
    def branches(self) -> List[Tuple[FeatureCache, InputSelection]]:
        """Every cache the run reads with its input, the primary first."""
        return [(self.cache, self.selection)] + list(self.more)

    def close_more(self) -> None:
        """Close the further caches :func:`prepare` opened (the primary is the caller's)."""
        for c, _ in self.more:
            c.close()


def prepare(config: TrainConfig, *, cache: Optional[FeatureCache] = None) -> PreparedData:
    """Open the cache and check every choice against it (clear errors before any training).

    ``cache``: the already open :class:`FeatureCache` of ``config.cache`` (the heads of one
    data pass share it).
    """
    check_config(config)
    if cache is None:
        check_cache_dir(config.cache)  # a run, model or corpus directory: say what it is, not "incomplete cache"
        cache = FeatureCache(config.cache, verify=config.verify)
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
                                              include_xo=config.train_on_xo, classes=cache.classes)
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
    weights = (class_weights(labels, cache.classes) if (config.task != "attributes" and uses_weights(config.loss)
                                         and config.sampler is None) else None)
    attributes = None
    if config.task != "categories":
        attributes = np.stack([attribute_values(c) for c in clips]) if clips else np.zeros((0, len(ATTRIBUTES)))
        if config.task == "joint" and np.isnan(attributes).any(axis=1).all():
            raise ConfigError(f"--task joint: no training clip of split {config.train_split} in cache {cache.path} "
                              f"has arousal, valence and dominance values")
    gender = None
    if config.aux == "gender":
        gender = gender_targets(clips)
        if np.isnan(gender).all():
            raise ConfigError(f"--aux gender: no training clip of split {config.train_split} in cache {cache.path} "
                              f"has a known gender (Gender Male or Female in labels_consensus.csv; a cache "
                              f"extracted before genders were recorded reads every clip as Unknown)")
    more = _open_more(config, cache, train_names, dev_names)
    return PreparedData(cache, selection, train_names, targets, labels, dev_names, counts, weights, attributes,
                        gender, cache.classes, more)


def predicted_names(cache: FeatureCache) -> List[str]:
    """The clips a run predicts: every split's, noise-augmented copies left out."""
    return [n for s in cache.splits for n in cache.split(s, augmented=False)]


def branch_names(primary: FeatureCache, other: FeatureCache, names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """The clips of ``other`` that stand for ``names`` of the primary cache (a noise-augmented copy
    of the primary reads its source clip's features in ``other`` when ``other`` has no copy of its
    own: a text cache has one transcript per clip), and the names ``other`` has no clip for."""
    mapped, missing = [], []
    for n in names:
        if n in other.clips:
            mapped.append(n)
        elif primary.is_augmented(n) and primary.source(n) in other.clips:
            mapped.append(primary.source(n))
        else:
            mapped.append(n)
            missing.append(n)
    return mapped, missing


def _open_more(config: TrainConfig, cache: FeatureCache, train_names: Sequence[str],
               dev_names: Sequence[str]) -> List[Tuple[FeatureCache, InputSelection]]:
    """Open a fusion run's further caches and check that each holds every clip the run reads
    (its Train and Development clips, and every clip it predicts); a clear error naming the
    missing clips otherwise. Each cache's frames are mixed by their own layer weights."""
    more: List[Tuple[FeatureCache, InputSelection]] = []
    try:
        for path in config.more_caches:
            check_cache_dir(path)
            other = FeatureCache(path, verify=config.verify)
            more.append((other, None))
            for what, names in (("Train/Development", list(train_names) + list(dev_names)),
                                ("predicted", predicted_names(cache))):
                _, missing = branch_names(cache, other, names)
                if missing:
                    shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
                    raise ConfigError(f"cache {other.path} lacks {len(missing)} {what} clip(s) of the primary cache "
                                      f"{cache.path}: {shown}; every --cache of a fusion run must hold the same "
                                      f"clips (extract it over the same corpus, e.g. with a transcript for every "
                                      f"clip)")
            selection = select_input(other, "weighted", False)
            mapped, _ = branch_names(cache, other, list(train_names) + list(dev_names) + predicted_names(cache))
            check_clips(other, mapped, selection)
            more[-1] = (other, selection)
    except BaseException:
        for c, _ in more:
            c.close()
        raise
    return more


def head_configs_for(config: TrainConfig, data: "PreparedData") -> List[HeadConfig]:
    """The head's config (one :class:`HeadConfig`), or a fusion head's: one per cache, the primary's
    first (its classifier sizes and outputs are the head's)."""
    first = head_config_for(config, data.selection, data.classes)
    return [first] + [HeadConfig(dim=sel.dim, num_layers=sel.num_layers,
                                 layers="weighted" if sel.positions is None else 0, pooling=config.pooling,
                                 hidden=first.hidden, dropout=first.dropout, num_classes=first.num_classes,
                                 attributes=first.attributes, gender=first.gender)
                      for _, sel in data.more]


def make_dataset(data: "PreparedData", names: Sequence[str], *, preload: bool = False, progress: bool = False,
                 desc: str = "loading features"):
    """The clips ``names`` of the run's cache (a :class:`ClipDataset`), or of each of a fusion run's
    caches side by side (a :class:`FusionDataset`)."""
    main = ClipDataset(data.cache, names, data.selection, None, preload=preload, progress=progress, desc=desc)
    if not data.more:
        return main
    parts = [main]
    for other, sel in data.more:
        mapped, _ = branch_names(data.cache, other, names)
        parts.append(ClipDataset(other, mapped, sel, None, preload=preload, progress=progress,
                                 desc=f"{desc} ({other.path.name})"))
    return FusionDataset(parts)


def data_bytes(data: "PreparedData", names: Sequence[str]) -> int:
    """Bytes the selected features of ``names`` take in memory, over every cache of the run."""
    total = feature_bytes(data.cache, names, data.selection)
    for other, sel in data.more:
        total += feature_bytes(other, branch_names(data.cache, other, names)[0], sel)
    return total


def head_config_for(config: TrainConfig, selection: InputSelection, classes: ClassSet = MSP_PODCAST) -> HeadConfig:
    extra = {}
    if not classes.is_default:
        extra = {"num_classes": len(classes)}
    if config.task != "categories":  # a categories head's config stays as it always was
        extra = {"attributes": len(ATTRIBUTES), "num_classes": 0 if config.task == "attributes" else len(classes)}
    if config.aux == "gender":
        extra["gender"] = 1
    return HeadConfig(dim=selection.dim, num_layers=selection.num_layers,
                      layers="weighted" if selection.positions is None else 0,
                      pooling="stats" if selection.kind == "pooled" else config.pooling,
                      hidden=config.hidden, dropout=config.dropout, **extra)


def check_out_dir(config: TrainConfig, out_dir) -> None:
    """Refuse an output directory that is a cache directory of the run or lies inside one."""
    out = Path(out_dir).resolve()
    for given in config.caches:
        cache = Path(given).resolve()
        if out == cache or cache in out.parents:
            where = "is the cache directory" if out == cache else f"lies inside the cache directory {given}"
            raise ConfigError(f"--out {out_dir} {where}; the run's files would be mixed with the cache's. "
                              f"Choose an output directory outside the cache (e.g. runs/<name>)")


def output_bytes(model: torch.nn.Module, clips: int) -> int:
    """About how many bytes a run directory takes: the checkpoint (the best weights, float32)
    written beside the previous one, predictions CSV lines and the JSON files."""
    params = sum(p.numel() for p in model.parameters())
    return 2 * 4 * params + 150 * clips + (1 << 20)


def use_preload(config: TrainConfig, nbytes: int) -> bool:
    if config.preload == "yes":
        return True
    if config.preload == "no":
        return False
    return nbytes <= config.preload_budget_gb * GIB


def pass_key(config: TrainConfig, data: PreparedData) -> tuple:
    """What the heads of one data pass share: the cache, the input read from it, the training
    clips in their order (sampler, seed, batch size), the Development split and the runtime
    options (device, preloading, loader workers, threads, checks, stacking, CUDA graphs), and a fusion run's further caches
    with the input read from each. Runs with equal keys read the same
    batches; the loss, targets, pooling, sizes, learning rate, epochs and patience may differ.
    The task may differ too when the clips are the same: an attributes run trains on every
    clip with attribute values (X and O included) and is scored on the Development clips with
    attribute values, so it shares a pass only with runs reading those very clips."""
    return (str(Path(config.cache).resolve()), data.selection, tuple(data.train_names), tuple(data.dev_names),
            config.sampler,
            config.seed, config.batch_size, config.train_split, config.dev_split, config.device, config.preload,
            config.preload_budget_gb, config.num_workers, config.threads, config.verify, config.stack_heads,
            config.cuda_graphs,
            tuple((str(Path(c.path).resolve()), sel) for c, sel in data.more))


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
                caches[where] = FeatureCache(config.cache, verify=config.verify)
            data = prepare(config, cache=caches[where])
            data.close_more()
            key = pass_key(config, data)
        except Exception:  # noqa: BLE001 - it fails again, with its message, when trained
            key = ("alone", i)
        groups.setdefault(key, []).append(i)
    for cache in caches.values():
        cache.close()
    return list(groups.values())
